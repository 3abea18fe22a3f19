// Validates the custom resources among Kubernetes objects (a JSON list on stdin) against the
// operators' own CRD schemas, as published in @kubernetes-models; prints one line per object.
import { readFileSync } from "node:fs";
const docs = JSON.parse(readFileSync(0, "utf8"));
const packages = {
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
  "keda.sh": "@kubernetes-models/keda",
};
let failed = 0;
for (const doc of docs) {
  const [group, version] = doc.apiVersion.split("/");
  if (!packages[group]) continue;
  const module = await import(`${packages[group]}/${group}/${version}/${doc.kind}`);
  try {
    new module[doc.kind](doc).validate();
    console.log(`valid ${doc.kind}/${doc.metadata.name}`);
  } catch (err) {
    failed++;
    console.log(`INVALID ${doc.kind}/${doc.metadata.name}: ${err.message}`);
  }
}
process.exit(failed ? 1 : 0);
