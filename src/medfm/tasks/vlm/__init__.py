"""Vision-language tasks on a CLIP-style run: zero-shot classification, retrieval, report generation
(plain and retrieval-augmented) and closed-question VQA."""
