"""syncd: keeps an ERP in step with MasonHub through webhooks and polling."""

__version__ = "0.1.0"
