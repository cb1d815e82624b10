"""Lesion reports: proposed for a request (:mod:`.providers`: the offline and OpenAI-compatible providers;
:mod:`.generation`: the offline provider and the merge with the request and the scan), or measured from a
labelled CT (:mod:`.extraction`)."""

from lesiondiffusion.reports.providers import (
    OfflineReportProvider,
    OpenAIReportProvider,
    ReportProvider,
    make_provider,
    read_text,
)

__all__ = ["OfflineReportProvider", "OpenAIReportProvider", "ReportProvider", "make_provider", "read_text"]
