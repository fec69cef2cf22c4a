// Runs browser/node/secagg.js under Node.js for tests/test_secagg_run.py: the JS mask PRG, KDF
// and masking against shared/testdata/secagg.json, and an ML-KEM-768 round trip with
// pqcrypto's side (stdin: {"public_key": hex, ...}). Prints one JSON document on stdout.
//
//   node secagg_node.mjs golden <secagg.json>
//   node secagg_node.mjs kem < {"ciphertext": hex, "secret_key": hex}  (decapsulate here)

import { readFileSync } from 'node:fs';

import { checkSecagg, kemDecaps, kemEncaps, kemKeygen } from '../../browser/node/secagg.js';

const hex = (a) => Buffer.from(a).toString('hex');
const [command, arg] = process.argv.slice(2);
let out;
if (command === 'golden') {
  out = checkSecagg(JSON.parse(readFileSync(arg, 'utf8')));
} else if (command === 'kem') {
  const input = JSON.parse(readFileSync(0, 'utf8'));
  const mine = kemKeygen();
  const enc = kemEncaps(Buffer.from(input.public_key, 'hex'));
  out = {
    public_key: hex(mine.publicKey), secret_key: hex(mine.secretKey),
    ciphertext: hex(enc.cipherText), shared_secret: hex(enc.sharedSecret),
    decapsulated: input.ciphertext ? hex(kemDecaps(Buffer.from(input.secret_key, 'hex'),
      Buffer.from(input.ciphertext, 'hex'))) : null,
  };
} else {
  process.stderr.write('usage: secagg_node.mjs golden <secagg.json> | kem < json\n');
  process.exit(2);
}
process.stdout.write(JSON.stringify(out));
