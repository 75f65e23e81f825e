"""Pseudo-labels: the scoring stage and the rules that turn cached scores into labels.

The rules register themselves in ``vlpl.registry.RULES`` when first looked up (lazily), so importing this
package, or its torch-free ``params`` module, does not import torch.
"""
