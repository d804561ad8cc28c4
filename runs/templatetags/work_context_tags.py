"""Work-context chips for run rows and the run header (runs/work_context.py)."""

from __future__ import annotations

from django import template

from runs import work_context

register = template.Library()


@register.filter
def work_chips(attributes: dict | None) -> list[dict]:
    """Plain strings and a percent-encoded query per chip: the template escapes them."""
    return work_context.chips(attributes)
