"""What reading an export costs since issue 31, on a 224 px ResNet50 (random weights, one torch thread): the
two identity digests, the four-probe overflow check and the whole load_export. Usage:
python benchmarks/export_identity_cost.py WORK_DIR (docs/robustness.md, "Checkpoints")."""
import time, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import onnx
from safetensors.torch import load_file
from cxr.models.checkpoint import save_checkpoint
from cxr.config import get_experiment
from cxr.data.layout import CLASSES
from cxr.models.classifier import build_model, preprocessing
from cxr.inference.export import export_model, load_export
from cxr.inference import export_identity
from cxr.inference.trained_model import check_finite_outputs

root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
ckpt = root / "r50_224.pt"
if not ckpt.exists():
    torch.manual_seed(0)
    exp = get_experiment("resnet50_full", image_size=224, weights="none")
    model = build_model("resnet50", weights="none", image_size=224)
    save_checkpoint({"model": model.state_dict(), "experiment": exp.to_dict(), "classes": list(CLASSES), "epoch": 1,
                     "preprocessing": preprocessing("resnet50", 224), "seed": 42}, ckpt)
out = root / "export"
if not out.exists():
    t = time.perf_counter(); export_model(ckpt, out); print(f"export {time.perf_counter()-t:.1f} s")
def timed(label, fn, n=3):
    best = min((lambda: (lambda t: (fn(), time.perf_counter() - t)[1])(time.perf_counter()))() for _ in range(n))
    print(f"{label}: {best:.2f} s (best of {n})")
tensors = load_file(str(out / "model.safetensors"))
graph = onnx.load(str(out / "model.onnx"))
timed("weights_digest (safetensors tensors)", lambda: export_identity.weights_digest(tensors))
timed("onnx_weights_digest", lambda: export_identity.onnx_weights_digest(graph))
model, _ = load_export(out)
timed("check_finite_outputs (4 probes, hooks)", lambda: check_finite_outputs(model, 224, "x"))
timed("load_export total", lambda: load_export(out))
