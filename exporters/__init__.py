"""stars_deploy.exporters: student -> NIR; NIR -> Loihi netx; ONNX (see the export issues)."""
