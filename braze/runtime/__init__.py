"""Custom ops that run braze's generated kernels. Importing this registers all of them
(a graph served from Inductor's cache calls them without braze's passes running first)."""

from . import collective, delta_rule, heads, moe, post_conv, router, rowwise, sibling_mm, streams, topk  # noqa: F401
