"""Handlers as SageMaker PyTorch users write them: model_fn, input_fn, predict_fn, no output_fn."""

import io
import json
import os

import torch
from net import TRANSFORM, Net
from PIL import Image


def model_fn(model_dir):
    with open(os.path.join(model_dir, "classes.json")) as f:
        classes = json.load(f)
    model = Net(len(classes))
    model.load_state_dict(torch.load(os.path.join(model_dir, "model.pth"), map_location="cpu"))
    model.classes = classes
    return model.eval()


def input_fn(request_body, content_type):
    if content_type not in ("image/jpeg", "image/png", "application/x-image"):
        raise ValueError(f"unsupported content type {content_type}")
    return TRANSFORM(Image.open(io.BytesIO(request_body)).convert("RGB")).unsqueeze(0)


def predict_fn(data, model):
    with torch.no_grad():
        probabilities = torch.softmax(model(data), dim=1)[0]
    best = int(probabilities.argmax())
    return {"label": model.classes[best], "probability": float(probabilities[best])}
