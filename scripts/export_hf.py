"""Export a trained moelab LM as a Hugging Face model: `python scripts/export_hf.py <checkpoint> <out_dir>`.

Writes `save_pretrained` layout (config.json + model.safetensors) of `Qwen2MoeForCausalLM`,
loadable with `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`; settings with
no Hugging Face equivalent are refused in one line (see moelab.use.export_hf). Needs the
`export` extra (transformers >= 5)."""

import argparse
import sys

from moelab.run.errors import one_line_errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a moelab LM checkpoint: last.ckpt, best-*.ckpt or a sharded folder")
    parser.add_argument("out_dir", help="the folder to write")
    # The checkpoint as the first word, or as ckpt_path= as eval.py, predict.py and generate.py also take it.
    args = parser.parse_args([a.removeprefix("ckpt_path=") for a in sys.argv[1:]])
    with one_line_errors():
        from moelab.use.export_hf import export

        out = export(args.checkpoint, args.out_dir)
    print(f"wrote {out} (Qwen2MoeForCausalLM): transformers.AutoModelForCausalLM.from_pretrained('{out}')")


if __name__ == "__main__":
    sys.exit(main())
