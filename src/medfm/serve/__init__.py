"""medfm in the hospital: one engine (models loaded once) behind an HTTP service (`medfm serve`), a DICOMweb
watcher (`medfm pacs watch`) and agent tools over MCP (`medfm mcp`)."""
