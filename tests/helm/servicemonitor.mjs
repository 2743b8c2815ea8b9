// Checks ServiceMonitors (JSON, a list on stdin) with the validators of
// @kubernetes-models/prometheus-operator, which are generated from the
// Prometheus Operator's CRD schemas. Prints one line per resource;
// exits 1 if any is invalid.
//
//   node servicemonitor.mjs < servicemonitors.json
//
// Run from the install folder (tests/helm/setup), where node_modules is.
import fs from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

let failed = 0;
for (const resource of JSON.parse(fs.readFileSync(0, "utf8"))) {
  const name = resource?.metadata?.name;
  try {
    new ServiceMonitor(resource).validate();
    console.log(`${name}: valid`);
  } catch (e) {
    failed += 1;
    console.log(`${name}: invalid: ${e.message}`);
  }
}
process.exit(failed ? 1 : 0);
