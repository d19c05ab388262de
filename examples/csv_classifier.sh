#!/usr/bin/env bash
# Train a classifier from a CSV through the CLI, then predict and clean up.
#
# Needs a running server (`gradstream serve` in another terminal, or `make serve`) and
# `gradstream` on PATH (`source .venv/bin/activate`). GRADSTREAM_TARGET picks another
# server than 127.0.0.1:50051.
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# Two features, three classes; the label is the first column and has a header name.
python - <<'EOF'
import numpy as np
rng = np.random.default_rng(0)
label = rng.integers(0, 3, 900)
centers = np.array([[0.0, 2.0], [2.0, -1.0], [-2.0, -1.0]])
x = centers[label] + rng.normal(0, 0.6, (900, 2))
rows = np.column_stack([label, x])
np.savetxt("train.csv", rows[:800], delimiter=",", fmt="%.5g", header="class,x1,x2", comments="")
np.savetxt("holdout.csv", rows[800:, 1:], delimiter=",", fmt="%.5g")
np.savetxt("holdout_labels.txt", rows[800:, 0], fmt="%d")
EOF

gradstream create example-classifier --spec '{
  "architecture": {"kind": "mlp", "in_features": 2, "hidden": [16], "out_features": 3},
  "init": {"kind": "seed", "seed": 0},
  "loss": {"kind": "cross_entropy"},
  "optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.9}}'
gradstream train example-classifier train.csv --y-columns class --labels \
    --batch-size 32 --epochs 10 --shuffle --seed 1
gradstream predict example-classifier holdout.csv > logits.csv

# Accuracy on the held-out rows: the class with the largest logit.
python - <<'EOF'
import numpy as np
logits = np.loadtxt("logits.csv", delimiter=",")
labels = np.loadtxt("holdout_labels.txt")
print(f"held-out accuracy: {(logits.argmax(axis=1) == labels).mean():.3f}")
EOF
gradstream delete example-classifier
