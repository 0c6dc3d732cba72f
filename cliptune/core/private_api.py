"""The private or undocumented parts of other packages that cliptune relies on: the one list of them.

Each has no public equivalent in the versions named; upgrading one of those packages means checking its
entries here first (tests/test_side_effects.py fails when a listed name is gone). Anything not listed is
public API. Versions: "checked" is the release the test suite ran with; cliptune's pyproject.toml allows
the range from the lower bound given there.

| package (checked; allowed)           | private API                                       | used in                     | why there is no public way |
|--------------------------------------|---------------------------------------------------|-----------------------------|----------------------------|
| open_clip_torch (3.3.0; >=3.0)       | `open_clip.transformer.VisionTransformer._embeds`  | models/towers.py            | patch + class + position embeddings and ln_pre, so prompt tokens can join before the blocks (MaPLe, VPT-style prompts) |
| open_clip_torch (3.3.0; >=3.0)       | `open_clip.transformer.VisionTransformer._pool`    | models/towers.py            | the tower's own pooling (cls / avg / tok) after the blocks run with prompts |
| open_clip_torch (3.3.0; >=3.0)       | `open_clip.transformer.text_global_pool`          | models/towers.py            | the text tower's pooling (argmax / last / first) on hidden states computed with learned prompts; a module helper, not exported |
| open_clip_torch (3.3.0; >=3.0)       | `open_clip.hf_configs.arch_dict`                  | models/towers.py            | the layer attribute name of each Hugging Face text architecture open_clip supports |
| timm (1.0.31; as open_clip requires) | `timm.models.vision_transformer.VisionTransformer._pos_embed` | models/towers.py | the position embedding step of a timm ViT trunk (TimmModel towers, e.g. BiomedCLIP), so prompts can join before the blocks |
| torch (2.14.1; >=2.14.1,<3)          | `torch.Tensor._version`                           | methods/base.py             | the in-place version counter: the text-feature cache notices prompt parameters updated in place by the optimizer |
| huggingface_hub (2.4.0; >=0.23)      | `huggingface_hub.constants.HF_HUB_OFFLINE` (set, then restored) | models/loading.py (`_hub_offline`) | open_clip's `hf_hub_download` calls take no `local_files_only`; the module flag (what HF_HUB_OFFLINE=1 sets) is the only switch to try the cache without network first |

Replaced by public API (issue 18): click's `__click_params__` (cli.py generates its flags with `click.option`
from the option declarations), `nn.MultiheadAttention._qkv_same_embed_dim` (methods/lora.py checks
`in_proj_weight is None`), `nn.Module._buffers` (methods/tip_adapter.py uses `named_buffers` and `del`),
accelerate's private reset of `AcceleratorState` (training/session.py keeps the process's one state and refuses a
run that asks for another mixed precision).
"""

# (dotted name, the cliptune module that uses it): tests/test_side_effects.py checks that each still exists
# in the installed packages and that no other cliptune module uses these private names.
PRIVATE_APIS = (
    ("open_clip.transformer.VisionTransformer._embeds", "cliptune/models/towers.py"),
    ("open_clip.transformer.VisionTransformer._pool", "cliptune/models/towers.py"),
    ("open_clip.transformer.text_global_pool", "cliptune/models/towers.py"),
    ("open_clip.hf_configs.arch_dict", "cliptune/models/towers.py"),
    ("timm.models.vision_transformer.VisionTransformer._pos_embed", "cliptune/models/towers.py"),
    ("torch.Tensor._version", "cliptune/methods/base.py"),
    ("huggingface_hub.constants.HF_HUB_OFFLINE", "cliptune/models/loading.py"),
)
