// The Image object a guest disk or a volume is made from, as the node's image cache needs it (ImageCache.ensure).
// One resolver for the agent's Server reconciler (compute.ts) and its volume host (volumes/host.ts).
import type { KubernetesObject } from '@kubernetes/client-node';
import { type Image, ImageKind } from '../../../operator/src/api/index.ts';
import { type GVR, isNotFound, type KubeClient } from '../../../operator/src/runtime/index.ts';
import type { ImageSource } from './cache.ts';

export const IMAGES: GVR = { group: ImageKind.group, version: ImageKind.version, plural: ImageKind.plural };

/** The Image `name` in `namespace` as the node's image cache needs it; undefined when it does not exist. */
export async function imageSourceOf(
  client: KubeClient,
  name: string,
  namespace: string,
): Promise<ImageSource | undefined> {
  let img: Image & KubernetesObject;
  try {
    img = await client.get<Image & KubernetesObject>(IMAGES, name, namespace || undefined);
  } catch (err) {
    if (isNotFound(err)) return undefined;
    throw err;
  }
  return {
    name,
    namespace,
    uid: img.metadata?.uid ?? '',
    url: img.spec.source.url,
    diskFormat: img.spec.diskFormat,
    ...(img.spec.checksum
      ? { checksum: { algorithm: img.spec.checksum.algorithm, value: img.spec.checksum.value } }
      : {}),
  };
}
