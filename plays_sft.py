"""
An offline SFT set cut from the embedded Shakespeare plays, for prepare.py --sft:

    python plays_sft.py                              # -> data/plays_sft.jsonl
    python prepare.py --sft=data/plays_sft.jsonl --block_size=512 --out_dir=data/plays_sft

Each play is cut into consecutive, non-overlapping pieces; a piece is one JSON line with
    prompt:    the speeches before (about --context_chars), then the next speaker's name
    response:  that speaker's speech (its first lines, up to --response_chars)
so no response appears in any other pair's prompt, and most of a prompt lies far behind the
response: what a short window cannot see.
"""
import argparse
import json
import os
import re

from prepare import shakespeare_files
from storage import write_atomically

SPEAKER = re.compile(r'^\*\*([^*]+)\*\*\s*$', re.M)  # a speech starts with its speaker's name in bold


def speeches(text):
    """(name line, speech) of a play, in order."""
    starts = [m.start() for m in SPEAKER.finditer(text)] + [len(text)]
    for a, b in zip(starts, starts[1:]):
        head, _, body = text[a:b].partition('\n')
        yield head + '\n', body.strip('\n') + '\n'


def pairs(text, context_chars, response_chars):
    context = ''
    for head, body in speeches(text):
        if len(context) >= context_chars:
            lines, response = body.splitlines(keepends=True), ''
            for line in lines:  # whole lines, at least one
                if response and len(response) + len(line) > response_chars:
                    break
                response += line
            yield {'prompt': context + head, 'response': response}
            context = ''  # the next pair's prompt starts after this response
        else:
            context += head + body + '\n'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=os.path.join('data', 'plays_sft.jsonl'))
    parser.add_argument('--context_chars', type=int, default=1500)
    parser.add_argument('--response_chars', type=int, default=300)
    args = parser.parse_args(argv)
    rows = [row for path in shakespeare_files()
            for row in pairs(open(path, encoding='utf-8').read(), args.context_chars, args.response_chars)]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_atomically(args.out, lambda f: f.writelines(json.dumps(r) + '\n' for r in rows), mode='w')
    print(f"{args.out}: {len(rows)} prompt/response pairs")


if __name__ == '__main__':
    main()
