"""Published ViT-B/16 figures (mean of 3 seeds) from the PromptSRC paper and its peers' READMEs, for side-by-side
comparison in reports. Keys: dataset names of ``prompts.data``; methods by their class names here."""

from __future__ import annotations

PAPER_METHOD = {
    "PromptSRC": "PromptSRC",
    "IVLP": "IVLP",
    "CoOp": "CoOp",
    "ZeroShotCLIP": "CLIP",
    "KgCoOp": "KgCoOp",
}

# Base-to-novel (Base, Novel, HM).
BASE_TO_NOVEL: dict[str, dict[str, tuple[float, float, float]]] = {
    "Average": {
        "CLIP": (69.34, 74.22, 71.70),
        "CoOp": (82.69, 63.22, 71.66),
        "IVLP": (84.21, 71.79, 77.51),
        "KgCoOp": (80.73, 73.60, 77.00),
        "PromptSRC": (84.26, 76.10, 79.97),
    },
    "ImageNet": {
        "CLIP": (72.43, 68.14, 70.22),
        "CoOp": (76.47, 67.88, 71.92),
        "PromptSRC": (77.60, 70.73, 74.01),
    },
    "Caltech101": {
        "CLIP": (96.84, 94.00, 95.40),
        "CoOp": (98.00, 89.81, 93.73),
        "PromptSRC": (98.10, 94.03, 96.02),
    },
    "OxfordPets": {
        "CLIP": (91.17, 97.26, 94.12),
        "CoOp": (93.67, 95.29, 94.47),
        "PromptSRC": (95.33, 97.30, 96.30),
    },
    "StanfordCars": {
        "CLIP": (63.37, 74.89, 68.65),
        "CoOp": (78.12, 60.40, 68.13),
        "PromptSRC": (78.27, 74.97, 76.58),
    },
    "OxfordFlowers": {
        "CLIP": (72.08, 77.80, 74.83),
        "CoOp": (97.60, 59.67, 74.06),
        "PromptSRC": (98.07, 76.50, 85.95),
    },
    "Food101": {
        "CLIP": (90.10, 91.22, 90.66),
        "CoOp": (88.33, 82.26, 85.19),
        "PromptSRC": (90.67, 91.53, 91.10),
    },
    "FGVCAircraft": {
        "CLIP": (27.19, 36.29, 31.09),
        "CoOp": (40.44, 22.30, 28.75),
        "PromptSRC": (42.73, 37.87, 40.15),
    },
    "SUN397": {
        "CLIP": (69.36, 75.35, 72.23),
        "CoOp": (80.60, 65.89, 72.51),
        "PromptSRC": (82.67, 78.47, 80.52),
    },
    "DescribableTextures": {
        "CLIP": (53.24, 59.90, 56.37),
        "CoOp": (79.44, 41.18, 54.24),
        "PromptSRC": (83.37, 62.97, 71.75),
    },
    "EuroSAT": {
        "CLIP": (56.48, 64.05, 60.03),
        "CoOp": (92.19, 54.74, 68.69),
        "PromptSRC": (92.90, 73.90, 82.32),
    },
    "UCF101": {
        "CLIP": (70.53, 77.50, 73.85),
        "CoOp": (84.69, 56.05, 67.46),
        "PromptSRC": (87.10, 78.80, 82.74),
    },
}

# Few-shot on all classes, average over the 11 datasets, by shots.
FEW_SHOT_AVERAGE: dict[str, dict[int, float]] = {
    "CoOp": {1: 67.56, 2: 70.65, 4: 74.02, 8: 76.98, 16: 79.89},
    "PromptSRC": {1: 72.32, 2: 75.29, 4: 78.35, 8: 80.69, 16: 82.87},
}

# Source ImageNet (16 shots) -> target test sets (cross-dataset and domain generalisation).
TRANSFER: dict[str, dict[str, float]] = {
    "CoOp": {
        "ImageNet": 71.51,
        "Caltech101": 93.70,
        "OxfordPets": 89.14,
        "StanfordCars": 64.51,
        "OxfordFlowers": 68.71,
        "Food101": 85.30,
        "FGVCAircraft": 18.47,
        "SUN397": 64.15,
        "DescribableTextures": 41.92,
        "EuroSAT": 46.39,
        "UCF101": 66.55,
        "ImageNetV2": 64.20,
        "ImageNetSketch": 47.99,
        "ImageNetA": 49.71,
        "ImageNetR": 75.21,
    },
    "CLIP": {
        "ImageNet": 66.73,
        "ImageNetV2": 60.83,
        "ImageNetSketch": 46.15,
        "ImageNetA": 47.77,
        "ImageNetR": 73.96,
    },
    "PromptSRC": {
        "ImageNet": 71.27,
        "Caltech101": 93.60,
        "OxfordPets": 90.25,
        "StanfordCars": 65.70,
        "OxfordFlowers": 70.25,
        "Food101": 86.15,
        "FGVCAircraft": 23.90,
        "SUN397": 67.10,
        "DescribableTextures": 46.87,
        "EuroSAT": 45.50,
        "UCF101": 68.75,
        "ImageNetV2": 64.35,
        "ImageNetSketch": 49.55,
        "ImageNetA": 50.90,
        "ImageNetR": 77.80,
    },
}


def paper_base_to_novel(method: str, dataset: str) -> tuple[float, float, float] | None:
    return BASE_TO_NOVEL.get(dataset, {}).get(PAPER_METHOD.get(method, method))


def paper_transfer(method: str, dataset: str) -> float | None:
    return TRANSFER.get(PAPER_METHOD.get(method, method), {}).get(dataset)
