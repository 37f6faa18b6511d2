"""The synthetic warehouse's size and time span: patients for a number of notes, and dates as a hospital's
feed has them: each encounter on a day of a span that ends on 2025-12-31 (`LAST_DAY`), weekdays busier than
weekends (`WEEKEND_SHARE`), the span growing with the size so a weekday holds about `WEEKDAY_NOTES` notes,
up to three years (`span_days`).
"""
from __future__ import annotations

import datetime as dt
import math

from bertxml.config import GenerateConfig

LAST_DAY = 20453                 # 2025-12-31 (a Wednesday) as days since 1970-01-01: every warehouse's newest night
MAX_DAYS = 1096                  # a warehouse spans at most three years, 2023-01-01 .. 2025-12-31
MIN_DAYS = 28                    # and at least four weeks, so a patient's encounters fall on distinct days
WEEKDAY_NOTES = 45               # notes a weekday holds where the span is not capped: a small hospital's feed
WEEKEND_SHARE = 0.4              # a Saturday's or Sunday's notes relative to a weekday's (wards, no clinics)


def n_patients(cfg: GenerateConfig) -> int:
    """Patients needed for about cfg.notes notes."""
    return max(1, round(cfg.notes / (cfg.encounters_per_patient * cfg.notes_per_encounter)))


def span_days(cfg: GenerateConfig) -> int:
    """Days the warehouse's notes span, ending on LAST_DAY: enough for a weekday to hold about WEEKDAY_NOTES
    notes (a week holds 5 + 2 * WEEKEND_SHARE weekdays' worth), within MIN_DAYS .. MAX_DAYS. A bigger
    warehouse spans more days, up to three years, then each day grows busier: 1,500 notes are six weeks
    of a small hospital, 1M notes three years of a large one (about 900 a weekday)."""
    per_day = WEEKDAY_NOTES * (5 + 2 * WEEKEND_SHARE) / 7
    return min(MAX_DAYS, max(MIN_DAYS, math.ceil(cfg.notes / per_day)))


def last_date() -> dt.date:
    """The newest night of every generated warehouse."""
    return dt.date(1970, 1, 1) + dt.timedelta(days=LAST_DAY)


def is_weekend(day: int) -> bool:
    return (day + 3) % 7 >= 5             # 1970-01-01 (day 0) was a Thursday: Monday is 0


def check_generate_config(cfg: GenerateConfig) -> None:
    """Raise ValueError naming the first setting the generator cannot use."""
    if cfg.notes < 1:
        raise ValueError(f"generate.notes must be at least 1, got {cfg.notes}")
    if cfg.seed < 0:
        raise ValueError(f"generate.seed must be 0 or more, got {cfg.seed}")
    for key in ("notes_per_encounter", "encounters_per_patient"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"generate.{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("bad_row_rate", "drop_rate", "long_note_rate"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise ValueError(f"generate.{key} must be between 0 and 1, got {getattr(cfg, key)}")
    if 4 * cfg.drop_rate + 3 * cfg.bad_row_rate > 1:
        raise ValueError(f"generate.drop_rate={cfg.drop_rate} and bad_row_rate={cfg.bad_row_rate} leave no "
                         "good notes (4 * drop_rate + 3 * bad_row_rate must be at most 1)")
    if cfg.partitions < 1:
        raise ValueError(f"generate.partitions must be at least 1, got {cfg.partitions}")
