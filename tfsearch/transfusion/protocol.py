"""Where a paper-profile job departs from the paper's training protocol, so that no departure stays silent.

The paper trains with anomaly textures from DTD and, on object categories, places anomalies on the released
foreground masks. Without `--texture-root` tfsearch draws procedural textures instead, and without `--fg-root`
it estimates an object's foreground from the image border (`tfsearch.transfusion.synthesis`), and a profile
override `subtle_share` adds anomaly appearances the paper never draws. All are fine for a quick run and wrong
for a reproduction, so a job of the `paper` profile that lacks them says so: `tfsearch train` and every
training trial print it (`Trainer.start`), the run's driver prints it once (`ProgressView`), and the report
lists it under the run. All of them ask `paper_protocol_note`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tfsearch.data.datasets import is_texture_category
from tfsearch.transfusion.profiles import PAPER_PROFILE

NOT_THE_PAPERS_PROTOCOL = "not the paper's protocol"


def paper_protocol_note(recorded: Mapping[str, Any]) -> str | None:
    """`not the paper's protocol: …` naming each departure of a job as it is recorded: a run's config.json
    (`RunPlan.describe`, all its categories) or a training run's job.json (`TrainJob.to_dict`, one category).
    None for a faithful job, and for any profile but the paper's (a quick profile departs by design)."""
    if recorded["profile"].get("name") != PAPER_PROFILE:
        return None
    dataset = recorded["dataset"]
    categories = recorded["categories"] if "categories" in recorded else [recorded["category"]]
    departures = []
    if recorded.get("texture_root") is None:
        departures.append("procedural anomaly textures instead of DTD (--texture-root DTD/images)")
    subtle_share = recorded["profile"].get("subtle_share", 0.0)
    if subtle_share > 0:
        departures.append(
            f"subtle anomaly appearances for a share {subtle_share:g} of anomalies (subtle_share)"
        )
    objects = [c for c in categories if not is_texture_category(dataset, c)]
    if objects and not recorded.get("restrict_to_foreground", True):
        departures.append(
            f"anomalies anywhere on the object categor{_plural(objects)} {', '.join(objects)} instead of on"
            " the foreground (--no-foreground)"
        )
    elif objects and recorded.get("fg_root") is None:
        departures.append(
            f"foreground of the object categor{_plural(objects)} {', '.join(objects)} estimated from the"
            " image border instead of the released foreground masks (--fg-root)"
        )
    return f"{NOT_THE_PAPERS_PROTOCOL}: {'; '.join(departures)}" if departures else None


def _plural(names: Sequence[str]) -> str:
    return "y" if len(names) == 1 else "ies"


__all__ = ["NOT_THE_PAPERS_PROTOCOL", "paper_protocol_note"]
