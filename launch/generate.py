"""Generate from a merged model or a mixture checkpoint.

python launch/generate.py --model_path OUTPUT_DIR/merged/model --prompt "name[Zizzi], eatType[pub] =>"
python launch/generate.py --model_path OUTPUT_DIR/checkpoints/step-N --model_name_or_path BASE --eval_mode random
python launch/generate.py --model_path smollm2:135m-instruct --chat --prompt "What is the capital of France?"
"""

from adamix_ds.cli import exit_process, run_main
from adamix_ds.export.generation import generate_main, parse_generate_arguments

if __name__ == "__main__":
    exit_process(run_main(lambda: generate_main(*parse_generate_arguments())))
