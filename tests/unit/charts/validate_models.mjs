// Validates Kubernetes objects of third-party APIs (Gateway API, Istio, GKE) with the schemas and the
// validator that the @kubernetes-models npm packages ship (hack/install-tools.sh puts them under
// .tools/node). Reads one JSON object per line on stdin; writes one line {"ok": bool, "error": string} per
// object, in order.
//
//   node validate_models.mjs .tools/node < objects.jsonl
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const PACKAGES = {
  'gateway.networking.k8s.io': 'gateway-api',
  'networking.istio.io': 'istio',
  'networking.gke.io': 'gke',
};

const toolsDir = process.argv[2];
const input = readFileSync(0, 'utf8').split('\n').filter((line) => line.trim() !== '');
for (const line of input) {
  const obj = JSON.parse(line);
  const [group, version] = obj.apiVersion.split('/');
  const pkg = PACKAGES[group];
  let answer;
  if (!pkg) {
    answer = { ok: false, error: `no schema package for API group ${group}` };
  } else {
    const file = join(toolsDir, 'node_modules', '@kubernetes-models', pkg, group, version, `${obj.kind}.js`);
    try {
      const mod = await import(pathToFileURL(file).href);
      const Model = mod[obj.kind] ?? mod.default?.[obj.kind];
      new Model(obj).validate();
      answer = { ok: true };
    } catch (e) {
      answer = { ok: false, error: `${obj.apiVersion} ${obj.kind}: ${e.message ?? e}` };
    }
  }
  console.log(JSON.stringify(answer));
}
