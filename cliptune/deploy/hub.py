"""`cliptune export --format hub`: an adapted model in the layout open_clip shares models in on the Hugging Face
Hub, so that `open_clip.create_model_and_transforms("local-dir:DIR")` (or `hf-hub:org/name` once uploaded) loads
it without cliptune.

The folder holds `open_clip_config.json` (`model_cfg` + `preprocess_cfg`, as open_clip's `push_to_hf_hub`
writes it), `open_clip_model.safetensors` (the base model with the method's weights merged in), the tokenizer
files of a Hugging Face text tower, `templates.txt` (the prompt templates the run classified with) and a
`README.md` model card written from the run's config.yaml and metrics.json. Methods whose weights do not merge
into CLIP have no such layout: export them as a classifier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import yaml

from cliptune.config.run import RunConfig
from cliptune.core.errors import CliptuneError
from cliptune.core.runfolder import atomic_save_safetensors, read_json, replace_dir
from cliptune.models.loading import LoadedModel, ModelSpec
from cliptune.training.session import finished_run, load_run_method

HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = "open_clip_model.safetensors"
MODEL_CARD = "README.md"
TEMPLATES = "templates.txt"  # the prompt templates the run classified with, one per line (`--templates FILE`)


def model_config_dict(spec: ModelSpec) -> Dict:
    """The open_clip architecture config the run's base model was built from (what `model_cfg` must hold)."""
    import open_clip

    if spec.model_config:
        return json.loads(Path(spec.model_config).read_text())
    model = spec.model or ""
    for schema in ("hf-hub:", "local-dir:"):
        if model.startswith(schema):
            return json.loads(Path(_schema_config(model)).read_text())["model_cfg"]
    config = dict(open_clip.get_model_config(spec.model))
    tag = open_clip.get_pretrained_cfg(spec.model, spec.pretrained) if spec.pretrained else {}
    if tag.get("quick_gelu"):  # open_clip switches QuickGELU on for such tags (e.g. OpenAI's weights)
        config["quick_gelu"] = True
    return config


def _schema_config(name: str) -> str:
    if name.startswith("local-dir:"):
        return str(Path(name[len("local-dir:"):]) / HUB_CONFIG)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(name[len("hf-hub:"):], HUB_CONFIG)  # in the local cache: the run loaded this model


def base_model_name(spec: ModelSpec) -> str:
    """The base model as the Hub's `base_model` field names it: a repo id, else the open_clip name and tag."""
    if spec.model and spec.model.startswith("hf-hub:"):
        return spec.model[len("hf-hub:"):]
    return f"{spec.display_name} ({Path(spec.pretrained).name if spec.pretrained else 'random init'})"


def export_hub(run_dir: str | Path, output: str | Path) -> Path:
    """Write the run's merged model, open_clip config, tokenizer files and model card into the folder `output`."""
    config, _, sidecar = finished_run(run_dir)
    method = load_run_method(run_dir)
    parts = method.wise_parts()
    if "head" in parts:
        raise CliptuneError(f"{run_dir} classifies with a linear head, which an open_clip model has no place for: "
                            "use --format classifier (or --format merged, which writes the head beside the model)")
    model: LoadedModel = method.model
    output = Path(output)
    staging = output.with_name(f".{output.name}.staging")
    staging.mkdir(parents=True, exist_ok=True)
    hub_config = {"model_cfg": model_config_dict(model.spec),
                  "preprocess_cfg": {"mean": list(model.mean), "std": list(model.std), "interpolation": model.interpolation}}
    (staging / HUB_CONFIG).write_text(json.dumps(hub_config, indent=2) + "\n")
    atomic_save_safetensors(staging / HUB_WEIGHTS, parts["clip"], metadata={"format": "pt"})
    if hasattr(model.tokenizer, "save_pretrained"):  # a Hugging Face tokenizer: open_clip reads it from the folder
        model.tokenizer.save_pretrained(str(staging))
    (staging / TEMPLATES).write_text("".join(f"{template}\n" for template in method.templates))
    metrics = read_json(Path(run_dir) / "metrics.json")
    (staging / MODEL_CARD).write_text(model_card(config, metrics, sidecar["method"], model.spec))
    replace_dir(staging, output)
    return output


def _row(name: str, block: Dict) -> str:
    cells = [block.get(key) for key in ("top1", "top5", "balanced_accuracy", "macro_f1")]
    return f"| {name} | " + " | ".join("–" if v is None else f"{100 * v:.1f}" for v in cells) + " |"


def model_card(config: RunConfig, metrics: Dict, method: str, spec: ModelSpec) -> str:
    """The Hub model card: front matter the Hub indexes, what was adapted on what, test metrics beside zero-shot."""
    front = {"library_name": "open_clip", "pipeline_tag": "zero-shot-image-classification", "base_model": base_model_name(spec),
             "tags": ["clip", "open_clip", "cliptune", method]}
    classes, test = metrics.get("classes", []), metrics.get("test") or {}
    shots = f"{config.shots} images per class" if config.shots else "all training images"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {spec.display_name} adapted with cliptune `{method}`", "",
             f"Base model: `{base_model_name(spec)}`. Adapted with cliptune's `{method}` method on "
             f"`{Path(config.data or 'data').name}` ({len(classes)} classes, {shots}, seed {config.seed}).", "",
             "## Test results (%)", "", "| model | top-1 | top-5 | balanced accuracy | macro-F1 |", "|---|---|---|---|---|",
             _row("zero-shot (base model)", metrics.get("zeroshot") or {}), _row(f"adapted ({method})", test), "",
             f"{test.get('n', '?')} test images. Classes: {', '.join(classes)}.", ""]
    guard = (metrics.get("guard") or {}).get("message")
    if guard:
        lines += [f"**Note:** {guard}", ""]
    lines += ["## Use", "", "```python", "import open_clip", "",
              'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH/TO/THIS/FOLDER")',
              'tokenizer = open_clip.get_tokenizer("local-dir:PATH/TO/THIS/FOLDER")', "```", "",
              f"Classify zero-shot style with the prompt templates it was adapted with (`{TEMPLATES}`): average the text "
              "features of each class's prompts and pick the most similar class, or run "
              f"`cliptune zeroshot --model local-dir:PATH --templates PATH/{TEMPLATES} --data DATA`.", "",
              "## Intended use and limitations", "",
              "Adapted from few labelled images for the classes above; it is only as good as those images are "
              "representative. Measure it on data of your own before relying on it, and do not use it for "
              "clinical or other high-stakes decisions without a validation that meets that domain's standards.", ""]
    return "\n".join(lines)
