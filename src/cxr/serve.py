"""A local demo page (``cxr serve``): choose or drop an image, see the predicted class, every class's
probability as bars and the Grad-CAM overlay.

Built with Gradio, an optional dependency (the ``demo`` extra), imported only here so the core install
stays lean. Each upload goes through ``cxr.predict.predict_images`` with the model loaded once, so the page
shows exactly the probabilities ``cxr predict`` prints. Nothing leaves the machine: Gradio's analytics are
off, no share link is made, and by default the page listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import IMAGE_EXTENSIONS
from .export import load_for_inference
from .predict import predict_images
from .runtime import Runtime

# The model's input is small (224 px, 32 in tests): show it as large as its box, pixels as squares.
CSS = "#cam img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
INSTALL_HINT = "uv sync --extra demo"
# Uploads larger than this are refused by Gradio before they are stored (HTTP 413): an uncompressed 16-bit
# 3000 x 3000 DICOM radiograph is 18 MB, so 64 MB leaves room without letting anyone fill the disk or memory.
MAX_UPLOAD_BYTES = 64 * 2**20


class ServeError(RuntimeError):
    """The page cannot start: Gradio (the ``demo`` extra) is missing, or the address cannot be listened on."""


def import_gradio() -> Any:
    """Gradio with its usage analytics off (set before the import, which reads it)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise ServeError(f"the demo page needs the 'demo' extra ({error.name} is missing): {INSTALL_HINT}") from None
    return gradio


@dataclass
class Predictor:
    """A checkpoint's model, classes and preprocessing, loaded once for every upload."""

    model: torch.nn.Module
    classes: list[str]
    preprocessing: dict[str, Any]
    runtime: Runtime
    name: str
    header: str = ""

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, device: str | None = None) -> "Predictor":
        runtime = Runtime.create(device, progress=False)  # a bad --device is refused before the model loads
        model, classes, prep = load_for_inference(checkpoint)
        return cls(model, classes, prep, runtime, Path(checkpoint).name, model_header(checkpoint))

    def classify(self, path: str | os.PathLike) -> tuple[dict[str, float], np.ndarray]:
        """Every class's probability and the image beside its Grad-CAM (uint8 RGB); ValueError with the
        reason when the file cannot be read as an image."""
        with tempfile.TemporaryDirectory(prefix="cxr-serve-") as cam_dir:
            result = predict_images(self.model, self.classes, self.preprocessing, [Path(path)], self.runtime,
                                    cam_dir=Path(cam_dir))
            if result.failures:
                raise ValueError(f"{Path(path).name}: {result.failures[0][1]}")
            with Image.open(result.cam_files[0]) as pair:
                overlay = np.asarray(pair.convert("RGB"))
        row = result.table.iloc[0]
        return {name: float(row[name]) for name in self.classes}, overlay


def model_header(checkpoint: str | os.PathLike) -> str:
    """Which model the page runs, in one line: experiment, checkpoint and epoch, commit and test macro-F1, read
    from the export's model.json or, for a checkpoint, from its run's metrics.json when that describes it."""
    from .checkpoint import load_checkpoint
    from .export import _run_metrics, read_description

    path = Path(checkpoint)
    if path.is_dir():
        description = read_description(path)
        name, found = description["experiment"]["name"], description.get("metrics") or {}
    else:
        state = load_checkpoint(path)
        name, found = state["experiment"]["name"], _run_metrics(path, state)
    test = found.get("test") or {}
    score = test.get("macro_f1")
    interval = (test.get("ci95") or {}).get("macro_f1")
    scored = ("test macro-F1 unknown (no metrics.json of this checkpoint beside it)" if score is None else
              f"test macro-F1 {score:.3f}" + (f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})" if interval else ""))
    return (f"Experiment `{name}`, `{path.name}` (epoch {found.get('epoch', '?')}), commit "
            f"`{found.get('commit') or 'unknown'}`, {scored}")


def probability_table(probabilities: dict[str, float]) -> str:
    """Markdown table of the probabilities to six decimals, as ``cxr predict --csv`` writes them."""
    rows = "\n".join(f"| {name} | {value:.6f} |" for name, value in probabilities.items())
    return f"| class | probability |\n|---|---|\n{rows}"


def build_demo(predictor: Predictor) -> Any:
    """The page: a file picker (drop or choose), the class probabilities as bars, the Grad-CAM overlay."""
    gr = import_gradio()

    def cleared() -> tuple[None, None, str]:
        return None, None, ""

    def classify(path: str | None) -> tuple[dict[str, float], np.ndarray, str]:
        if path is None:
            raise gr.Error("choose an image first", print_exception=False)
        try:
            probabilities, overlay = predictor.classify(path)
        except ValueError as error:  # shown on the page; no traceback in the server's console
            raise gr.Error(str(error), print_exception=False) from None
        return probabilities, overlay, probability_table(probabilities)

    kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
    with gr.Blocks(title="cxr demo", analytics_enabled=False) as demo:
        gr.Markdown(f"## Chest X-ray classification\n{predictor.header or f'Checkpoint `{predictor.name}`'}; classes "
                    f"{', '.join(predictor.classes)}, on {predictor.runtime.device}. A research demo, not a diagnosis.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label=f"Image ({kinds})", file_types=sorted(IMAGE_EXTENSIONS), elem_id="upload")
                table = gr.Markdown(elem_id="probability-table")
            with gr.Column():
                label = gr.Label(num_top_classes=len(predictor.classes), label="Prediction", elem_id="prediction")
                cam = gr.Image(label="Image and Grad-CAM of the predicted class", interactive=False, height=300,
                               elem_id="cam")
        outputs = [label, cam, table]
        # A new upload first clears the last result, so a failed one never leaves another image's result showing.
        upload.upload(cleared, outputs=outputs, api_visibility="private", queue=False).then(
            classify, inputs=upload, outputs=outputs, api_name="classify")
        upload.clear(cleared, outputs=outputs, api_visibility="private", queue=False)
    return demo


def serve(checkpoint: str | os.PathLike, host: str = "127.0.0.1", port: int | None = None,
          device: str | None = None, block: bool = True, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> Any:
    """Load the checkpoint and start the page; blocks until Ctrl-C unless ``block`` is False (then call
    ``.close()`` on the returned demo). Uploads over ``max_upload_bytes`` are refused. Raises ServeError or
    CheckpointError."""
    import_gradio()
    demo = build_demo(Predictor.load(checkpoint, device))
    try:
        demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True,
                    show_error=True, footer_links=["api", "settings"], css=CSS, max_file_size=max_upload_bytes)
    except OSError as error:
        where = f"{host}:{port}" if port else f"{host} (ports 7860-7959)"
        raise ServeError(f"cannot listen on {where}: the port is taken or the address is not this machine's "
                         f"({error}); choose another --port or --host") from None
    print(f"Demo page: {demo.local_url} (Ctrl-C stops it)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"Listening on {host}: anyone who can reach port {demo.server_port} of this machine can use the page.")
    if block:
        demo.block_thread()
    return demo
