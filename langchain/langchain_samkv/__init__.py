"""LangChain integration for samkv-integrations."""

__all__: list[str] = []
