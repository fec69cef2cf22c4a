"""The ML library: the torch model zoo, data and shards, workloads, scoring, the inner
optimizer and the ONNX train-step export. Imported by the server and by native nodes alike
(torch, numpy); never imports `server`, `native_node` or `transport`."""
