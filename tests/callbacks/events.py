"""Reading TensorBoard event files in tests, with TensorBoard's own EventAccumulator."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def load_events(log_dir: Path) -> EventAccumulator:
    """Every scalar, histogram, image and tensor (text) event under one run directory."""
    events = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    )
    events.Reload()
    return events


def text_tags(events: EventAccumulator) -> list[str]:
    """Text summaries are stored as tensors named `<tag>/text_summary`."""
    return [t.removesuffix("/text_summary") for t in events.Tags()["tensors"] if t.endswith("/text_summary")]
