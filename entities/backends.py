"""Face detection and embedding backends: dlib, OpenCV cascades, open_clip image encoders.

All of them work offline: dlib's HOG detector ships inside dlib, its landmark and 128-d face-recognition models
come from the ``face-recognition-models`` package, OpenCV ships its Haar cascades, and open_clip uses weights
from a local file (randomly initialised without one, which is logged). Boxes are ``(x0, y0, x1, y1)`` pixels
of an RGB ``uint8`` image.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from agreement.optional import optional_import

log = logging.getLogger(__name__)


class FaceDetector(Protocol):
    def detect(self, image: np.ndarray) -> np.ndarray: ...


class FaceEmbedder(Protocol):
    def embed(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray: ...


def _dlib():
    return optional_import(
        "dlib", extra="faces", purpose="the dlib face detector and embedding (package dlib-bin)"
    )


def dlib_model_file(name: str) -> Path:
    """Path of a model file shipped by ``face-recognition-models``, found without importing the package
    (its ``__init__`` needs ``pkg_resources``, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "'face_recognition_models' is needed for the dlib face embedding but is not installed; "
            "install it with: pip install 'agreement-ssl[faces]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file missing from the face-recognition-models package")
    return path


class DlibDetector:
    """dlib's frontal-face detector: HOG (fast, in dlib) or the CNN (MMOD) model of face-recognition-models."""

    def __init__(self, upsample: int = 1, model: Literal["hog", "cnn"] = "hog") -> None:
        dlib = _dlib()
        self.upsample = upsample
        self.model = model
        if model == "hog":
            self._detector = dlib.get_frontal_face_detector()
        elif model == "cnn":
            self._detector = dlib.cnn_face_detection_model_v1(
                str(dlib_model_file("mmod_human_face_detector.dat"))
            )
        else:
            raise ValueError(f"dlib detector model must be 'hog' or 'cnn', got {model!r}")

    def detect(self, image: np.ndarray) -> np.ndarray:
        found = self._detector(np.ascontiguousarray(image), self.upsample)
        rects = [f.rect if hasattr(f, "rect") else f for f in found]
        boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in rects]
        return _clip_boxes(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), image.shape)


class OpenCVCascadeDetector:
    """OpenCV Haar cascade (``opencv-python-headless`` ships the XML files)."""

    def __init__(
        self,
        cascade: str = "haarcascade_frontalface_default.xml",
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: int = 24,
    ) -> None:
        self._cv2 = optional_import(
            "cv2", extra="faces", purpose="OpenCV face detection (opencv-python-headless)"
        )
        path = Path(cascade)
        if not path.is_file():
            path = Path(self._cv2.data.haarcascades) / cascade
        self._classifier = self._cv2.CascadeClassifier(str(path))
        if self._classifier.empty():
            raise FileNotFoundError(f"OpenCV cascade {cascade!r} could not be loaded")
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, min_size

    def detect(self, image: np.ndarray) -> np.ndarray:
        gray = self._cv2.cvtColor(np.ascontiguousarray(image), self._cv2.COLOR_RGB2GRAY)
        found = self._classifier.detectMultiScale(
            gray, self.scale_factor, self.min_neighbors, minSize=(self.min_size, self.min_size)
        )
        boxes = np.asarray(found, dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        return _clip_boxes(boxes, image.shape)


def _clip_boxes(boxes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    height, width = shape[:2]
    boxes = boxes.copy()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    keep = (boxes[:, 2] - boxes[:, 0] >= 2) & (boxes[:, 3] - boxes[:, 1] >= 2)
    return boxes[keep]


def crop(image: np.ndarray, box: np.ndarray, margin: float = 0.2) -> np.ndarray:
    """The box enlarged by ``margin`` of its size on every side (the paper adds a fixed 20 px), clipped."""
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    height, width = image.shape[:2]
    left, top = int(max(0, x0 - dx)), int(max(0, y0 - dy))
    right, bottom = int(min(width, x1 + dx)), int(min(height, y1 + dy))
    return image[top:bottom, left:right]


class DlibEmbedder:
    """dlib's ResNet face-recognition model: 5-point alignment, then a 128-d embedding per box."""

    dim = 128

    def __init__(self, jitter: int = 0) -> None:
        dlib = _dlib()
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))
        self._model = dlib.face_recognition_model_v1(
            str(dlib_model_file("dlib_face_recognition_resnet_model_v1.dat"))
        )
        self.jitter = jitter

    def embed(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        image = np.ascontiguousarray(image)
        vectors = []
        for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4):
            rect = self._dlib.rectangle(int(x0), int(y0), int(x1), int(y1))
            shape = self._shape(image, rect)
            vectors.append(np.asarray(self._model.compute_face_descriptor(image, shape, self.jitter)))
        return np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)


class OpenClipEmbedder:
    """An open_clip image encoder on face (or scene) crops; L2-normalised embeddings of the model's size.

    ``weights`` is a local file or an already cached open_clip tag, loaded strictly by ``agreement.clip.build_clip``
    (nothing is downloaded). Without weights the model is randomly initialised, with a warning: useful for
    wiring, not for names. Crops go through the model's own open_clip evaluation preprocessing.
    """

    def __init__(self, model: str = "ViT-B-32", weights: str | None = None, margin: float = 0.2) -> None:
        optional_import("open_clip", purpose="open_clip image embeddings")
        import torch
        from open_clip.transform import PreprocessCfg, image_transform_v2

        from agreement.clip import build_clip

        bundle = build_clip(model, pretrained=weights)
        self._torch = torch
        self._model = bundle.model.eval()
        self._preprocess = image_transform_v2(PreprocessCfg(**bundle.preprocess_cfg), is_train=False)
        self.margin = margin
        self.dim = int(bundle.model.visual.output_dim)

    def embed(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        from PIL import Image

        boxes = np.asarray(boxes).reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = self._torch.stack(
            [self._preprocess(Image.fromarray(crop(image, box, self.margin))) for box in boxes]
        )
        with self._torch.no_grad():
            features = self._model.encode_image(batch)
        return self._torch.nn.functional.normalize(features.float(), dim=1).numpy()


def make_detector(name: str, upsample: int = 1, min_size: int = 24) -> FaceDetector:
    """``dlib`` (HOG), ``dlib-cnn`` or ``opencv``."""
    if name == "dlib":
        return DlibDetector(upsample=upsample)
    if name == "dlib-cnn":
        return DlibDetector(upsample=upsample, model="cnn")
    if name == "opencv":
        return OpenCVCascadeDetector(min_size=min_size)
    raise ValueError(f"unknown face detector {name!r}; choose 'dlib', 'dlib-cnn' or 'opencv'")


def make_embedder(name: str, clip_model: str = "ViT-B-32", clip_weights: str | None = None) -> FaceEmbedder:
    """``dlib`` (128-d) or ``open_clip`` (the model's embedding size)."""
    if name == "dlib":
        return DlibEmbedder()
    if name == "open_clip":
        return OpenClipEmbedder(clip_model, clip_weights)
    raise ValueError(f"unknown face embedder {name!r}; choose 'dlib' or 'open_clip'")
