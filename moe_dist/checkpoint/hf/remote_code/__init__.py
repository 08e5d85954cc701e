"""Templates copied verbatim into a Hugging Face export (`export-hf` with a custom architecture).

They are self-contained on purpose: an exported directory must load with
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` where moe_dist is not
installed, so they import only torch and transformers. moe_dist never imports them.
"""
