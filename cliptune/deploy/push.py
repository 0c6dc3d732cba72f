"""`cliptune push`: a finished run as an open_clip model repository on the Hugging Face Hub, through `huggingface_hub`
(the folder `export --format hub` writes, uploaded whole)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from cliptune.core.errors import CliptuneError
from cliptune.deploy.export import export_run


def push_hub(run_dir: str | Path, repo: str, private: bool = False) -> str:
    """`export --format hub` into a temporary folder, then upload it as the model repository `repo` (created if
    missing); returns the repository's URL. Offline, unreachable or not logged in: one line, after the export (so a run
    that has no Hub layout is refused before any network)."""
    with tempfile.TemporaryDirectory(prefix="cliptune-push-") as scratch:
        folder = export_run(run_dir, "hub", Path(scratch) / "hub")
        api = HfApi()
        try:
            api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
            commit = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                       commit_message=f"cliptune push of {Path(run_dir).name}")
        except OfflineModeIsEnabled:
            raise CliptuneError(f"cannot push to the Hub in offline mode: write the folder with `cliptune export "
                                f"{run_dir} --format hub --output DIR` and upload it from a connected machine") from None
        except HfHubHTTPError as exc:
            raise CliptuneError(f"the Hub refused the push to {repo}: {str(exc).splitlines()[0]} (log in with "
                                "`hf auth login` or set HF_TOKEN)") from None
        except OSError as exc:  # requests' connection errors are OSErrors
            raise CliptuneError(f"cannot reach the Hub to push {repo}: {exc.__class__.__name__}") from None
    return str(commit.repo_url)
