"""Inference for a registered segmentation model, answering on the input image's own voxel grid."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.inferers import Inferer, SlidingWindowInferer
from monai.transforms import Compose, SqueezeDimd
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from appcore.errors import unprocessable
from appcore.precision import autocast
from radiology.inverse import InvertClassIndexd
from radiology.spec import CTWindow, ModelSpec
from radiology.transforms import ClassIndexd, preprocess
from radiology.windows import OVERLAP, infer_window

logger = logging.getLogger(__name__)


def restore_nifti_header(pred: np.ndarray, source: str) -> nib.Nifti1Image:
    """Wrap ``pred`` (a label on ``source``'s voxel grid) in ``source``'s header and affine."""
    src = nib.load(source)
    if tuple(pred.shape) != tuple(src.shape[:3]):
        raise RuntimeError(f"Prediction shape {pred.shape} differs from the image shape {src.shape[:3]}")
    header = src.header.copy()
    header.set_data_dtype(np.uint8)
    out = nib.Nifti1Image(pred.astype(np.uint8), src.affine, header)
    out.header.set_slope_inter(1, 0)
    return out


class ModelWindowInferer(Inferer):
    """MONAI's Gaussian sliding window, the window sized per input by ``radiology.windows.infer_window``.

    The one inferer of the server's infer and of an exported bundle (``radiology.export``), whose
    ``inference.json`` instantiates it by ``_target_``: a fixed window there would tile larger
    volumes otherwise than the server does.

    Args:
        roi_size: the training patch, the smallest window.
        max_scale: a window may grow up to this many times ``roi_size`` per axis.
        multiple: window sides are multiples of this (the network's downsampling factor).
        sw_batch_size: windows per forward pass.
        overlap: overlap of neighbouring windows.
    """

    def __init__(
        self,
        roi_size: tuple[int, ...] | list[int],
        *,
        max_scale: float = 1.0,
        multiple: int = 1,
        sw_batch_size: int = 1,
        overlap: float = OVERLAP,
    ) -> None:
        super().__init__()
        self.roi_size = tuple(int(r) for r in roi_size)
        self.max_scale, self.multiple = float(max_scale), int(multiple)
        self.sw_batch_size, self.overlap = int(sw_batch_size), float(overlap)

    def window(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The window for an input of spatial ``shape``."""
        overlap, scale, multiple = self.overlap, self.max_scale, self.multiple
        return infer_window(shape, self.roi_size, overlap=overlap, max_scale=scale, multiple=multiple)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        window = SlidingWindowInferer(
            roi_size=self.window(tuple(inputs.shape[2:])),
            sw_batch_size=self.sw_batch_size,
            overlap=self.overlap,
            mode="gaussian",
        )
        return window(inputs, network, *args, **kwargs)


def window_inferer(spec: ModelSpec, sw_batch_size: int = 1) -> ModelWindowInferer:
    """``spec``'s inferer (``ModelWindowInferer``)."""
    return ModelWindowInferer(
        spec.roi_size, max_scale=spec.max_window_scale, multiple=spec.size_multiple, sw_batch_size=sw_batch_size
    )


class SegmentationInfer(BasicInferTask):
    """Sliding-window segmentation with the model's pre-processing undone exactly on the output.

    The recorded steps (orientation, resampling) are undone on the class-index map by
    ``InvertClassIndexd``: what ``Invertd`` answers, by separable indexing into uint8 (the
    pre-processing objects are created once and reused, for its ``Invertd`` fallback); the label is
    written with the input file's header, so shape, spacing, origin and orientation match it voxel
    for voxel.

    Args:
        spec: the model.
        paths: candidate weight files, oldest first; the last one that exists is served, so a
            freshly published training result wins over the shipped weights.
        sw_batch_size: sliding windows per forward pass.
        cpu_bf16: on the CPU, run the network in bfloat16 where the CPU computes it natively
            (``appcore.precision``); CUDA always runs with mixed precision.
    """

    def __init__(self, spec: ModelSpec, paths: list[str], *, sw_batch_size: int = 2, cpu_bf16: bool = True) -> None:
        super().__init__(
            path=paths,
            network=spec.network(),
            type=InferType.SEGMENTATION,
            labels=spec.labels.name_to_id(),
            dimension=3,
            description=spec.description,
            load_strict=True,
        )
        self.spec = spec
        self._sw_batch_size = sw_batch_size
        self._cpu_bf16 = cpu_bf16
        self._pre = preprocess(spec, with_label=False)
        self._invert = InvertClassIndexd(keys="pred", transform=Compose(self._pre), orig_key="image")

    def is_valid(self) -> bool:
        # An untrained model is listed too: clients can save labels for it and start its training.
        return True

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["trained"] = self.get_path() is not None
        info["modality"] = self.spec.modality
        info["spacing"] = list(self.spec.spacing)
        info["colors"] = {label.name: label.hex_color for label in self.spec.labels}
        return info

    def pre_transforms(self, data: Any = None) -> list:
        return self._pre

    def inferer(self, data: Any = None) -> Inferer:
        return window_inferer(self.spec, self._sw_batch_size)

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict:
        image = data[self.input_key]
        # Refused for an untrained model too: a client must learn the image is unusable before labelling it.
        if float(image.max()) == float(image.min()):
            why = self._uniform_why()
            raise unprocessable(f"Every voxel of the image has the same value {why}: there is nothing to segment")
        if self.get_path() is None:
            # Untrained: an empty label instead of random noise, written straight on the input's grid
            # (``writer``): no class scores are made and nothing is resampled back.
            data["untrained"] = True
            return data
        network = self._get_network(device, data)
        with torch.inference_mode(), autocast(device, cpu_bf16=self._cpu_bf16):
            logits = self.inferer(data)(image[None].to(device), network)
        data[self.output_label_key] = logits[0].float().cpu()
        return data

    def _uniform_why(self) -> str:
        """What makes an image uniform once pre-processed, for the message refusing it."""
        window = self.spec.intensity
        if isinstance(window, CTWindow):
            span = f"[{window.low:g}, {window.high:g}] HU"
            return f"within the model's window {span} (a blank, all-NaN or out-of-window volume)"
        return "(a blank or all-NaN volume)"

    def post_transforms(self, data: Any = None) -> list:
        if data is not None and data.get("untrained"):
            return []  # nothing to undo: ``writer`` answers zeros on the input's grid
        return [
            ClassIndexd(keys=self.output_label_key),
            self._invert,
            SqueezeDimd(keys=self.output_label_key, dim=0),
        ]

    def writer(self, data: dict[str, Any], extension: Any = None, dtype: Any = None) -> tuple[str, dict]:
        source = str(data.get("image_path", ""))
        if data.get("untrained"):
            pred = np.zeros(nib.load(source).shape[:3], dtype=np.uint8)
        else:
            pred = np.asarray(torch.as_tensor(data[self.output_label_key]).cpu().numpy(), dtype=np.uint8)
        try:
            img = restore_nifti_header(pred, source)
        except nib.filebasedimages.ImageFileError as e:
            raise unprocessable(f"Cannot write the label on the grid of {source!r}: {e}") from None
        fd, out = tempfile.mkstemp(suffix=".nii.gz")
        os.close(fd)
        nib.save(img, out)
        result: dict[str, Any] = {"model_trained": not data.get("untrained", False)}
        if data.get("untrained"):
            result["message"] = f"Model '{self.spec.name}' has no trained weights yet: save labels and POST /train"
        return out, result
