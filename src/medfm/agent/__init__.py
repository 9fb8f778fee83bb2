"""Agent access to the served models: studies by pseudonymous ref, tools with provenance, an MCP server
and a scripted read of one study."""
