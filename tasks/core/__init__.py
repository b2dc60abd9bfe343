"""The bottom layer: errors, content hashes and stamps, artifact paths, table schemas, the strict params
base, the name -> module registry, ONNX graph helpers and model feeds. Imports nothing else of edgeopt."""
