"""Lesion reports: where the missing attributes of a request come from (:mod:`.providers`)."""

from lesiondiffusion.reports.providers import (
    OfflineReportProvider,
    OpenAIReportProvider,
    ReportProvider,
    make_provider,
    read_text,
)

__all__ = ["OfflineReportProvider", "OpenAIReportProvider", "ReportProvider", "make_provider", "read_text"]
