"""One site of a synthetic federation as the pretraining dataset a benchmark batches from."""

from __future__ import annotations

from pathlib import Path

from healthfm_core.data.sequences.code_stats import site_code_stats
from healthfm_core.data.sequences.tokens import PretrainingDataset, SiteSequences
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import open_site
from healthfm_core.terms.vocabulary import Vocabulary
from simulations.synthetic import generate_federation


def site_dataset(
    tmp: Path, scenario: str, site_name: str, subjects: int | None, max_events: int, max_patches: int
) -> tuple[PretrainingDataset, Vocabulary]:
    """`site_name` of `scenario` (seed 0, `subjects` per site) written under tmp: every subject
    once at its last time (max_events EHR tokens, max_patches wearable patches), and the site's
    vocabulary (codes of >= 5 subjects)."""
    manifest = generate_federation(tmp, scenario=scenario, seed=0, n_subjects=subjects, progress=False)
    site = open_site(manifest.site(site_name).root)
    vocab = build_vocabulary([site_code_stats(site, min_subjects=5)], min_subjects=5)
    ids = site.subject_splits()["subject_id"].to_numpy()
    dataset = PretrainingDataset(
        SiteSequences.from_site(site, vocab), ids, time_mode="last", max_events=max_events, max_patches=max_patches
    )
    return dataset, vocab
