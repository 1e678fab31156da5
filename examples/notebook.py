# %% [markdown]
# # Your own model to a spiking student, in a notebook
#
# The Python API end to end with a teacher that stars-deploy does not know: a small BatchNorm
# CNN defined and trained right here (on scikit-learn's bundled 8x8 digits, so nothing is
# downloaded). Run it as a script (`python examples/notebook.py`, about 2 minutes on a 2-core
# CPU) or cell by cell in Jupyter / VS Code (the `# %%` markers). Every function returns what
# the matching `stars-deploy` command prints with `--json`.

# %%
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import stars_deploy as sd

torch.manual_seed(0)
work = Path(os.environ.get("WORK") or tempfile.mkdtemp(prefix="stars-deploy-notebook-"))
BUDGET_S = float(os.environ.get("BUDGET_S", "60"))  # distillation wall-clock time

# %% [markdown]
# ## 1. A teacher of your own
# Any `nn.Module` with BatchNorm layers that maps (N, C, H, W) images, normalised as you trained
# it, to class logits. The synthesis matches its BatchNorm statistics, so those layers matter.

# %%
class TinyNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(32, classes)

    def forward(self, x):
        return self.classifier(self.features(x))


digits = load_digits()
images = (digits.images / 16.0).astype(np.float32)  # (N, 8, 8) in [0, 1]
labels = digits.target
x, y = torch.from_numpy(images[:, None]), torch.from_numpy(labels)
mean, std = float(x.mean()), float(x.std())
teacher = TinyNet()
optimizer = torch.optim.Adam(teacher.parameters(), lr=3e-3)
for epoch in range(15):  # a few seconds: ~95 % on the last 300 digits
    for batch in torch.randperm(1497).split(64):
        loss = nn.functional.cross_entropy(teacher((x[batch] - mean) / std), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
teacher.eval()
held_out = slice(1497, None)
print("teacher accuracy", float((teacher((x[held_out] - mean) / std).argmax(1) == y[held_out]).float().mean()))

# held-out digits as an .npz (uint8 images (N, H, W, C), labels (N,)): only for evaluation,
# distillation never sees them
test_file = work / "test.npz"
np.savez(test_file, images=(images[held_out, :, :, None] * 255).round().astype(np.uint8), labels=labels[held_out])

# %% [markdown]
# ## 2. Distil a spiking student from the teacher alone
# `normalization` is "m/s" per channel (or a name such as "imagenet"); `hflip=False` because a
# mirrored digit is another digit. `budget_s` bounds the distillation's wall-clock time.

# %%
run = sd.distill(teacher, input_shape=(1, 8, 8), num_classes=10, normalization=f"{mean}/{std}", hflip=False,
                 data=str(test_file), budget_s=BUDGET_S, family="convnet", runs_dir=work / "runs", name="tiny")
print(f"student {run['student_accuracy']:.1%} (teacher {run['teacher_accuracy']:.1%}) -> {run['run_dir']}")

# %% [markdown]
# ## 3. The student in your own code: a Norse module

# %%
student = sd.load_student(run["run_dir"])
with torch.no_grad():
    out = student((x[held_out][:8] - mean) / std)  # the student takes normalised images, like the teacher
print("logits over time", tuple(out.logits_t.shape), "predictions", out.logits.argmax(1).tolist())

# %% [markdown]
# ## 4. Deploy: NIR and Loihi (netx HDF5), then the bit-accurate emulator

# %%
for target in ("nir", "loihi"):
    record = sd.export(run["run_dir"], target)
    print(target, "->", ", ".join(record["files"]))
loihi = sd.simulate(run["run_dir"], "loihi")  # the run's own evaluation data: the held-out digits
print(f"Loihi emulator {loihi['accuracy']:.1%}, agreement with the float student {loihi['agreement']:.1%}, "
      f"{loihi['spikes_per_sample']:.0f} spikes and {loihi['synops_per_sample']:.0f} synaptic ops per image")

# %% [markdown]
# ## 5. Gate it as CI would, and write the report

# %%
gates = sd.check(run["run_dir"], "loihi", min_accuracy=0.5, max_accuracy_drop=0.05)
print("gates", "passed" if gates["passed"] else "FAILED", [(g["gate"], g["passed"]) for g in gates["gates"]])
print(sd.report(run["run_dir"], format="md")["markdown"])
print("HTML report:", sd.report(run["run_dir"])["report"])
