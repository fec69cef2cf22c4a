// Runs the browser's JS protocol code under Node.js for tests/test_js_golden.py: the same
// modules the tab loads (browser/node/*.js), the same checker the self-test page runs
// (browser/node/golden.js). Prints one JSON document on stdout.
//
//   node golden_node.mjs golden <testdata dir>   -> {codecs: [...], frames: [...], jsonSource}
//   node golden_node.mjs verdicts < hex.json     -> ["ok" | "<code>/<field>" | "crash: ...", ...]

import { readFileSync } from 'node:fs';
import { join } from 'node:path';

import { checkCodecs, checkFrames, frameVerdict } from '../../browser/node/golden.js';
import { fromHex } from '../../browser/node/floatbits.js';

// frame.js tells a float literal (5.0) from an int (5) only where JSON.parse passes the
// source text to its reviver (Chromium; Node >= 21, or 20 with --harmony-json-parse-with-source).
const jsonSource = JSON.parse('[1.0]', (k, v, ctx) => (k === '0' ? ctx?.source === '1.0' : v))[0];

function readJson(path) {
  return JSON.parse(readFileSync(path, 'utf8'));
}

const [command, arg] = process.argv.slice(2);
let out;
if (command === 'golden') {
  out = {
    codecs: checkCodecs(readJson(join(arg, 'codecs.json'))),
    frames: checkFrames(readJson(join(arg, 'frames.json'))),
    jsonSource,
  };
} else if (command === 'verdicts') {
  out = JSON.parse(readFileSync(0, 'utf8')).map((hex) => frameVerdict(fromHex(hex)));
} else {
  process.stderr.write('usage: golden_node.mjs golden <testdata dir> | verdicts < hex.json\n');
  process.exit(2);
}
process.stdout.write(JSON.stringify(out));
