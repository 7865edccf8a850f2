// The KeyPair controller: fingerprints the public key (as `ssh-keygen -l` shows it, SHA256:base64)
// and reports Ready, or InvalidKey when the key data does not decode.
import { createHash } from 'node:crypto';
import { type KeyPair, KeyPairKind } from '../api/index.ts';
import type { Manager, ReconcileContext, Request } from '../runtime/index.ts';
import { applyStatusIfChanged, gvrOf, requeueOnConflict, specOrMetaChanged, withConditions } from './common.ts';

/** OpenSSH's SHA256 fingerprint of a public key line, or undefined when the key blob is malformed. */
export function sshFingerprint(publicKey: string): string | undefined {
  const [type, data] = publicKey.trim().split(/\s+/);
  if (!type || !data) return undefined;
  const blob = Buffer.from(data, 'base64');
  // The blob starts with the key type as an SSH string: uint32 length + bytes.
  if (
    blob.length < 4 ||
    blob.readUInt32BE(0) !== type.length ||
    blob.subarray(4, 4 + type.length).toString() !== type
  ) {
    return undefined;
  }
  return `SHA256:${createHash('sha256').update(blob).digest('base64').replace(/=+$/, '')}`;
}

export function registerKeyPairController(mgr: Manager) {
  const keypairs = mgr.informer<KeyPair>(gvrOf(KeyPairKind));

  async function reconcile(req: Request, _ctx: ReconcileContext) {
    const kp = keypairs.get(req.name, req.namespace);
    if (!kp || kp.metadata.deletionTimestamp) return undefined;
    const gen = kp.metadata.generation;
    const fp = kp.spec.type === 'ssh' ? sshFingerprint(kp.spec.publicKey) : undefined;
    const ready =
      kp.spec.type === 'x509' || fp
        ? { type: 'Ready', status: 'True' as const, reason: 'KeyValid', message: 'the public key can be injected' }
        : {
            type: 'Ready',
            status: 'False' as const,
            reason: 'InvalidKey',
            message: 'the key data is not a valid base64 SSH key blob of its type',
          };
    await applyStatusIfChanged(mgr.client, KeyPairKind, kp, {
      fingerprint: fp, // describes the current key: cleared (meant to) when the key does not decode
      observedGeneration: gen,
      conditions: withConditions(kp.status?.conditions, [ready], gen),
    });
    return undefined;
  }

  const controller = mgr.addController({
    name: 'keypair',
    reconcile: requeueOnConflict(reconcile),
    maxConcurrentReconciles: 2,
  });
  controller.for(keypairs, { updatePredicate: specOrMetaChanged });
  return { controller };
}
