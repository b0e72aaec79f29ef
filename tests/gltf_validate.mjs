// Validates one .glb with the Khronos glTF validator and prints its JSON report.
//
//   node tests/gltf_validate.mjs FILE.glb
//
// The validator is the npm package gltf-validator, looked for in the folder
// $GLTF_VALIDATOR (the package's own folder) when set, else in
// tests/node_modules. Exit status 0 when the report could be made (read
// report.issues.numErrors for the verdict), 2 on usage or loading errors.
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(import.meta.url);

async function main() {
  const file = process.argv[2];
  if (!file) {
    console.error("usage: node gltf_validate.mjs FILE.glb");
    return 2;
  }
  const validator = require(process.env.GLTF_VALIDATOR || "gltf-validator");
  const bytes = new Uint8Array(await readFile(file));
  const report = await validator.validateBytes(bytes, { uri: path.basename(file), maxIssues: 0 });
  process.stdout.write(JSON.stringify(report, null, 1) + "\n");
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(String(err && err.stack ? err.stack : err));
    process.exit(2);
  },
);
