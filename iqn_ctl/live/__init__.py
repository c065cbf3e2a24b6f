"""The live ISP agent: XDP data plane (bcc), event loop, local API, history,
metrics."""
