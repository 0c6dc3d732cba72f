"""Linear probe: a logistic-regression head on frozen image features.

Default solver `lbfgs` is how CLIP (Radford et al., 2021, sec. 3.2 / appendix A.3) and CoOp's
`lpclip/` evaluate a linear probe: L2-regularised logistic regression solved to its optimum with
L-BFGS (sklearn's objective: C * sum of the log-losses + ||W||^2 / 2, bias unregularised), with C
searched on the validation split exactly as CoOp's `lpclip/linear_probe.py` does (`search_c`). Nothing is
trained by the engine: the head is fitted in `prepare()`. One deliberate difference: the features are
L2-normalised (lpclip fits raw features), so the fitted head, the zero-shot head and their WiSE-FT mixtures
share one input space.

Multi-label data: the same objective against each image's label set as a distribution (its k labels 1/k each,
`cliptune.data.multilabel`), with C chosen by validation mAP.

Solver `sgd` trains the head through the engine instead, starting from the zero-shot classifier
(weights = class text embeddings, bias 0, temperature = the model's logit scale).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.core.metrics import average_precisions
from cliptune.methods.base import Method, MethodConfig
from cliptune.core.options import option
from cliptune.models.zeroshot import zeroshot_weights

log = logging.getLogger("cliptune")
COARSE_C = [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]  # lpclip/linear_probe.py:54, in its order


@dataclass
class LinearProbeConfig(MethodConfig):
    solver: str = option("lbfgs", "lbfgs: logistic regression solved exactly, C searched on val (CLIP's protocol); "
                         "sgd: head trained by the engine from the zero-shot weights", choices=("lbfgs", "sgd"))
    init: str = option("zeroshot", "sgd solver: head initialisation", choices=("zeroshot", "random"), flag="--linear-probe-init")
    c: Optional[float] = option(None, "lbfgs solver: inverse L2 strength C; unset = searched on the validation split", above=0,
                               flag="--linear-probe-c")


def logistic_regression(features: torch.Tensor, labels: torch.Tensor, classes: int, c: float,
                        max_iter: int = 1000, start: Optional[tuple] = None) -> tuple:
    """(weight, bias) minimising C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2 (sklearn's LogisticRegression),
    from zeros or from `start` (a nearby solution: the C search warm-starts each fit from the previous one)."""
    x = features.double()
    labels = labels.double() if labels.is_floating_point() else labels  # multi-label targets: a distribution per image
    weight = torch.zeros(classes, x.shape[1], dtype=torch.float64) if start is None else start[0].clone()
    bias = torch.zeros(classes, dtype=torch.float64) if start is None else start[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        # divided by C * n so the numbers stay O(1); the minimiser is the same
        loss = F.cross_entropy(x @ weight.T + bias, labels, reduction="mean") + (weight**2).sum() / (2 * c * len(x))
        loss.backward()
        return loss

    optimizer.step(objective)
    return weight.detach(), bias.detach()


def _accuracy(features, labels, weight, bias) -> float:
    """Top-1 on val; mAP for multi-label targets (what the C search maximises)."""
    logits = features.double() @ weight.T + bias
    if labels.dim() == 2:
        precisions = average_precisions(logits.softmax(dim=1), labels)
        return sum(precisions) / max(1, len(precisions))
    return float((logits.argmax(dim=1) == labels).double().mean())


def search_c(train_x, train_y, val_x, val_y, classes: int) -> tuple:
    """(C, its solution) as CoOp's lpclip/linear_probe.py:54-118 searches it: the coarse grid 1e6 .. 1e-6 (the first
    best, so ties go to the LARGEST C), then an 8-step binary search in log10 space between C/10 and 10C that keeps
    the right end only when it is strictly better. The search fits stop after 100 L-BFGS iterations, warm-started from
    the nearest C's solution, where lpclip runs each to 1000 from zero (a 10x faster search; the chosen C is then
    fitted to 1000 iterations)."""
    solutions: dict = {}

    def score(c: float) -> float:
        nearest = min(solutions, key=lambda k: abs(math.log10(k) - math.log10(c)), default=None)
        solutions[c] = logistic_regression(train_x, train_y, classes, c, max_iter=100, start=solutions.get(nearest))
        return _accuracy(val_x, val_y, *solutions[c])

    coarse = [score(c) for c in COARSE_C]
    peak = COARSE_C[coarse.index(max(coarse))]
    left, right = math.log10(peak) - 1, math.log10(peak) + 1
    chosen = peak
    for _ in range(8):
        if score(10**left) < score(10**right):
            chosen, left = 10**right, (left + right) / 2
        else:
            chosen, right = 10**left, (left + right) / 2
    return chosen, solutions[chosen]


class LinearProbe(Method):
    # buffers (registered in __init__/prepare; declared for type checkers)
    scale: torch.Tensor
    name = "linear-probe"
    config_class = LinearProbeConfig
    config: LinearProbeConfig
    trains = "a linear head on frozen image features (L-BFGS logistic regression, C searched on val)"
    paper = "CLIP linear-probe protocol (Radford et al., ICML'21)"
    differs = ("L2-normalised features (lpclip fits raw ones), so the head mixes with the zero-shot head under WiSE-FT; "
               "the C search warm-starts 100-iteration fits where lpclip fits each from zero to 1000")
    uses_image_features = True
    wise_ft = True
    class_specific = True
    multi_label = True

    def __init__(self, model, classnames, templates, config: LinearProbeConfig, descriptions=None):
        super().__init__(model, classnames, templates, config, descriptions)
        weights = zeroshot_weights(model.text, self.classnames, self.templates)
        self.head = nn.Linear(weights.shape[1], len(self.classnames))
        with torch.no_grad():
            if config.init == "zeroshot":
                self.head.weight.copy_(weights)
                self.head.bias.zero_()
        self.head.requires_grad_(config.solver == "sgd")
        self.register_buffer("scale", model.logit_scale.detach().clone(), persistent=False)

    @classmethod
    def training_defaults(cls, shots):
        # sgd solver only (lbfgs trains nothing in the loop): the engine's AdamW, a few hundred steps.
        return {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "epochs": 30, "batch_size": 32}

    @classmethod
    def search_space(cls, shots):
        """Nothing by default: the lbfgs solver searches its C on val itself (for solver sgd, give `--space`)."""
        return {}

    def linear_head(self):
        return self.head

    @classmethod
    def zeroshot_endpoint(cls, model, classnames, templates, options):
        """The zero-shot head (whatever the run's `init`), under the run's fixed scale."""
        return super().zeroshot_endpoint(model, classnames, templates, {**options, "init": "zeroshot"})

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.scale * self.head(F.normalize(image_features, dim=-1))

    @torch.no_grad()
    def prepare(self, train, val=None) -> None:
        """lbfgs: fit the head to the optimum on the (normalised) training features, every augmented view a sample."""
        if self.config.solver != "lbfgs":
            return
        features, labels = train.features, train.labels
        if features.dim() == 3:  # (views, N, D): each view is one more training sample
            labels = labels.repeat(features.shape[0], *([1] * (labels.dim() - 1)))
            features = features.reshape(-1, features.shape[-1])
        x = F.normalize(features.float(), dim=-1).cpu()
        c, start = self.config.c, None
        if c is None:
            if val is None or not len(val):
                c = 1.0
                log.warning("linear-probe: no validation split to search C on; using C = 1")
            else:
                val_x = F.normalize(val.features.float(), dim=-1).cpu()
                with torch.enable_grad():
                    c, start = search_c(x, labels, val_x, val.labels, len(self.classnames))
                log.info("linear-probe: C = %.3g chosen on %d validation images", c, len(val))
        with torch.enable_grad():
            weight, bias = logistic_regression(x, labels, len(self.classnames), c, start=start)
        scale = float(self.scale)
        device = self.head.weight.device
        self.head.weight.copy_((weight / scale).to(device))
        self.head.bias.copy_((bias / scale).to(device))

