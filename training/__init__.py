"""Offline side of the CXR node: model definitions, ONNX export and the bundle writer.

Needs the `train` extra (torch, torchvision, onnx). The node and the workers never import it;
it imports `worker` for what training and serving must share: the class map, preprocessing,
the assembly of the classifier input and the bundle contract. Importing this package itself
pulls in no torch, so torch-free helpers such as `training.synthetic` stay usable without it.
"""
