"""metaprep: meta-training service that prepares pretrained LMs for fast adaptation.

Implements MLtD (Hou et al., TACL 2022), Meta-LoRA (Block et al., 2024) and transfer-learned
finetuning configurations (Strangmann et al., 2024) as one library; see DESIGN.md.
"""

__version__ = "0.12.2"
