"""braze: graph-level fusion compiler for LLM inference, built on torch.compile."""
