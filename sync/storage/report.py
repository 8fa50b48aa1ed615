"""What the storage stage did (or, for ``sync plan``, would do): objects and bytes per bucket, speed,
bucket settings that differ, and the objects refused with the API's message."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sync.errors import EXIT_OK, EXIT_QUARANTINED
from sync.storage.client import Bucket

MB = 1024 * 1024


def human_bytes(size: float) -> str:
    """``12.3 MB``-style sizes (binary units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class Tally:
    """Objects and their bytes."""

    objects: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.objects += 1
        self.bytes += size

    def __str__(self) -> str:
        return f"{self.objects:,} ({human_bytes(self.bytes)})"


def settings_drift(source: Bucket, target: Bucket) -> list[str]:
    """How the target bucket's settings differ from the source's, one phrase per setting."""
    notes = []
    for name in ("public", "file_size_limit", "allowed_mime_types"):
        ours, theirs = getattr(source, name), getattr(target, name)
        if ours != theirs:
            notes.append(f"{name} is {theirs!r} on the target, {ours!r} in the source")
    return notes


@dataclass
class StorageReport:
    """Counters of one storage stage (run) or survey (plan), per bucket where it matters."""

    to_copy: dict[str, Tally] = field(default_factory=dict)
    present_on_target: dict[str, Tally] = field(default_factory=dict)
    landed: dict[str, Tally] = field(default_factory=dict)
    missing_in_source: int = 0
    refusals: list[tuple[str, str]] = field(default_factory=list)
    repointed: int = 0
    retries: int = 0
    created_buckets: list[str] = field(default_factory=list)
    drift: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    elapsed: float = 0.0

    # -- counting --------------------------------------------------------------------------------

    def wanted(self, bucket: str, size: int) -> None:
        """An object to copy (survey)."""
        self.to_copy.setdefault(bucket, Tally()).add(size)

    def present(self, bucket: str, size: int) -> None:
        """An object the target already holds with the same content."""
        self.present_on_target.setdefault(bucket, Tally()).add(size)

    def copied(self, bucket: str, size: int) -> None:
        """An object that landed."""
        self.landed.setdefault(bucket, Tally()).add(size)

    def refused(self, key: str, message: str) -> None:
        """An object quarantined, with why."""
        self.refusals.append((key, message))

    def finish(self) -> None:
        """Stop the clock."""
        self.elapsed = time.monotonic() - self.started

    # -- totals ----------------------------------------------------------------------------------

    @staticmethod
    def _total(tallies: dict[str, Tally]) -> Tally:
        return Tally(sum(t.objects for t in tallies.values()), sum(t.bytes for t in tallies.values()))

    @property
    def copy_total(self) -> Tally:
        """What a survey found to copy."""
        return self._total(self.to_copy)

    @property
    def copied_total(self) -> Tally:
        return self._total(self.landed)

    @property
    def present_total(self) -> Tally:
        return self._total(self.present_on_target)

    @property
    def quarantined(self) -> int:
        return len(self.refusals)

    @property
    def mb_per_s(self) -> float:
        """Bytes copied per second of the stage, in MB/s."""
        return self.copied_total.bytes / MB / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def objects_per_s(self) -> float:
        """Objects settled (copied or found present) per second of the stage."""
        settled = self.copied_total.objects + self.present_total.objects + self.quarantined
        return settled / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 when every object landed or was present, 3 when some were quarantined."""
        return EXIT_QUARANTINED if self.refusals else EXIT_OK

    def counts(self) -> dict[str, object]:
        """The numbers, for the run record and ``--json``."""
        copied, present = self.copied_total, self.present_total
        return {
            "copied": copied.objects,
            "copied_bytes": copied.bytes,
            "present": present.objects,
            "present_bytes": present.bytes,
            "quarantined": self.quarantined,
            "repointed": self.repointed,
            "retries": self.retries,
            "seconds": round(self.elapsed, 3),
            "mb_per_s": round(self.mb_per_s, 2),
            "objects_per_s": round(self.objects_per_s, 1),
            "created_buckets": self.created_buckets,
            "drift": self.drift,
        }

    # -- text ------------------------------------------------------------------------------------

    def summary(self) -> str:
        """One line for a run's summary."""
        copied = self.copied_total
        return (
            f"files: {copied.objects:,} copied ({human_bytes(copied.bytes)}, {self.mb_per_s:,.1f} MB/s, "
            f"{self.objects_per_s:,.0f} objects/s) · {self.present_total.objects:,} already there · "
            f"{self.quarantined:,} quarantined · {self.repointed:,} rows repointed · {self.retries:,} retries"
        )

    def lines(self, shown: int = 10) -> list[str]:
        """The run's report: the summary, buckets created or differing, refused objects."""
        out = [self.summary()]
        out += [
            f"  bucket {b} created on the target with the source's settings" for b in self.created_buckets
        ]
        for bucket, notes in sorted(self.drift.items()):
            out += [f"  bucket {bucket} differs (left as it is): {note}" for note in notes]
        if self.refusals:
            out.append("  Quarantined files (see _sync.quarantine on the target):")
            out += [f"    {key}: {message}" for key, message in self.refusals[:shown]]
            if len(self.refusals) > shown:
                out.append(f"    … and {len(self.refusals) - shown:,} more")
        return out

    def plan_lines(self) -> list[str]:
        """What ``sync plan`` shows: per bucket, objects and bytes to copy and already there, and drift."""
        out = list(self.notes)
        for bucket in sorted(set(self.to_copy) | set(self.present_on_target) | set(self.drift)):
            copy = self.to_copy.get(bucket, Tally())
            there = self.present_on_target.get(bucket, Tally())
            out.append(f"bucket {bucket}: {copy} to copy, {there} already on the target")
            out += [f"  differs (left as it is): {note}" for note in self.drift.get(bucket, [])]
            if bucket in self.created_buckets:
                out.append("  missing on the target: created with the source's settings")
        if self.missing_in_source:
            out.append(
                f"{self.missing_in_source:,} referenced file(s) missing in the source (will be quarantined)"
            )
        return out
