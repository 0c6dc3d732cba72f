"""Linear probe: a logistic-regression head on frozen image features.

Default solver `lbfgs` is how CLIP (Radford et al., 2021, sec. 3.2 / appendix A.3) and CoOp's
`lpclip/` evaluate a linear probe: L2-regularised logistic regression solved to its optimum with
L-BFGS (sklearn's objective: C * sum of the log-losses + ||W||^2 / 2, bias unregularised), with C
searched on the validation split (a coarse log grid, then a finer one around the best, as CoOp's
`linear_probe.py` does). Nothing is trained by the engine: the head is fitted in `prepare()`.

Solver `sgd` trains the head through the engine instead, starting from the zero-shot classifier
(weights = class text embeddings, bias 0, temperature = the model's logit scale).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.methods.base import Method, MethodConfig
from cliptune.core.options import option
from cliptune.models.zeroshot import zeroshot_weights

log = logging.getLogger("cliptune")
COARSE_C = [10.0**k for k in range(-6, 7)]  # CoOp's initial search grid: 1e-6 .. 1e6


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
    return float(((features.double() @ weight.T + bias).argmax(dim=1) == labels).double().mean())


def search_c(train_x, train_y, val_x, val_y, classes: int) -> tuple:
    """(C, its solution) with the best validation accuracy: the coarse grid, then 8 log-spaced values
    around the best (ties go to the stronger regularisation). Fits run from strong to weak
    regularisation, each warm-started from the previous solution."""

    def best_of(grid):
        best, solution = None, None
        for c in sorted(grid):
            solution = logistic_regression(train_x, train_y, classes, c, max_iter=100, start=solution)
            score = _accuracy(val_x, val_y, *solution)
            if best is None or score > best[0]:
                best = (score, c, solution)
        return best[1], best[2]

    coarse, _ = best_of(COARSE_C)
    return best_of([coarse * 10 ** (k / 4) for k in range(-4, 5)])


class LinearProbe(Method):
    name = "linear-probe"
    config_class = LinearProbeConfig
    trains = "a linear head on frozen image features (L-BFGS logistic regression, C searched on val)"
    paper = "CLIP linear-probe protocol (Radford et al., ICML'21)"
    uses_image_features = True
    wise_ft = True
    class_specific = True

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
            labels = labels.repeat(features.shape[0])
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

