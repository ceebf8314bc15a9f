"""Serving the exported student: the ONNX contract and its session (`infer`), the model server and its
middleware, the client side of the protocol, and KServe manifests. Nothing in this package imports torch (a
test checks it)."""
