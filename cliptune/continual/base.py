"""What a continual strategy supplies to the task loop (`cliptune/continual/loop.py`), and the feature distillation
that LwF, LwF-VR and ZSCL share.

A strategy is built once per run from the run's settings (so a missing reference folder fails before any work),
then, for each task: picks the model it distils from (`teacher`), prepares what it needs (`start_task`), adds a
term to the task's loss (`regulariser`), sees every optimizer step, may replace the task's result (`task_state`)
and post-process the merged weights (`merge`). The base class is sequential fine-tuning: it adds nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Dict, List, Optional

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cliptune.config.run import RunConfig
from cliptune.data.folders import eval_transform
from cliptune.models.loading import LoadedModel
from cliptune.models.towers import AnyTextTower


class Strategy:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `cliptune continual --help`
    # run settings above the method's continual defaults (a recipe, flag or --set still overrides them)
    defaults: ClassVar[Dict] = {}

    def __init__(self, config: RunConfig):
        self.config = config

    @classmethod
    def problem(cls, config: RunConfig) -> Optional[str]:
        """Why this strategy cannot run with these settings (None when it can); checked before any work."""
        return None

    def teacher(self, initial: LoadedModel, previous: LoadedModel) -> LoadedModel:
        """The model a distilling strategy distils from: the previous task's by default."""
        return previous

    def start_task(self, method, teacher: LoadedModel, data, templates: List[str]) -> None:
        """Called before each task is learned, with the task's method, teacher and data."""

    # True while `regulariser` reads `sample_ids`, the batch's rows of the task's training split (e.g. their captions)
    reads_sample_ids: bool = False

    def regulariser(self, method, inputs: torch.Tensor, labels: torch.Tensor,
                    sample_ids: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """A term added to the method's loss on a training batch (None: nothing)."""
        return None

    def after_optimizer_step(self, method) -> None:
        """Called after every optimizer step of a task."""

    def task_state(self, method) -> Optional[Dict[str, torch.Tensor]]:
        """The learned state that replaces the method's own at the end of a task (None: keep the method's)."""
        return None

    def merge(self, state: Dict[str, torch.Tensor], task_start: Dict[str, torch.Tensor],
              initial: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The merged CLIP weights the next task starts from, given the task's, the task-start and the initial ones."""
        return state


# ----- feature distillation (ZSCL's code path, which its LwF baselines run too) -----
def distillation_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over rows: zero iff the distributions match."""
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    student = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def symmetric_distillation(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 2.0):
    """(image->text, text->image) distillation of (images, texts) logits: the rows, then the columns."""
    return (distillation_kl(teacher_logits, student_logits, temperature),
            distillation_kl(teacher_logits.T, student_logits.T, temperature))


def feature_distillation(student_images, teacher_images, teacher_texts, scale, temperature=2.0):
    """ZSCL's two terms on reference images: logits `scale * image @ text.T` of the student's and the
    teacher's image features, both against the *teacher's* text features (`finetune.py`: `logits_current
    = logit_scale.exp() * ref_out_current @ ref_embeddings.t()`, `logits_ref = ... ref_out @ ...`)."""
    texts = F.normalize(teacher_texts, dim=-1)
    student = scale * F.normalize(student_images, dim=-1) @ texts.T
    teacher = scale * F.normalize(teacher_images, dim=-1) @ texts.T
    return symmetric_distillation(teacher, student, temperature)


@torch.no_grad()
def encode_texts(text: AnyTextTower, tokens: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Unit-norm features of many token sequences, `chunk` at a time."""
    return torch.cat([text.encode(piece, normalize=True) for piece in tokens.split(chunk)])


class UnlabelledImages(Dataset):
    def __init__(self, files: List[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB"))


class FeatureDistillation(Strategy):
    """Distils the teacher's image-text distribution on a stream of images of its own (read with the eval transform,
    a batch per step, independent of the training batch) against the teacher's features of some texts: what
    `distillation_inputs` gives. The term is `distill_image * image->text + distill_text * text->image`."""

    def distillation_inputs(self, teacher: LoadedModel, data, templates: List[str]) -> tuple:
        """(image files, the teacher's unit-norm text features) to distil on."""
        raise NotImplementedError

    def start_task(self, method, teacher, data, templates) -> None:
        config, model = self.config, method.model
        images, self.texts = self.distillation_inputs(teacher, data, templates)
        self.teacher_model = teacher
        transform = eval_transform(model.image_size, model.mean, model.std, model.interpolation)
        self.stream = DataLoader(UnlabelledImages(images, transform), batch_size=config.batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(config.seed), drop_last=len(images) > config.batch_size)
        self._batches = iter(self.stream)
        self._text_generator = torch.Generator().manual_seed(config.seed)

    def next_images(self, device) -> torch.Tensor:
        try:
            batch = next(self._batches)
        except StopIteration:
            self._batches = iter(self.stream)
            batch = next(self._batches)
        return batch.to(device)

    def regulariser(self, method, inputs, labels, sample_ids=None):
        config, teacher = self.config, self.teacher_model
        images = self.next_images(inputs.device)
        texts = self.texts
        if config.vocab_per_step is not None and config.vocab_per_step < len(texts):  # a random subset per step
            texts = texts[torch.randperm(len(texts), generator=self._text_generator)[: config.vocab_per_step].to(texts.device)]
        student = method.model.image.encode(images, normalize=True)
        with torch.no_grad():
            reference = teacher.image.encode(images, normalize=True)
        image_side, text_side = feature_distillation(student, reference, texts, teacher.logit_scale, config.distill_temperature)
        return config.distill_image * image_side + config.distill_text * text_side
