// ValidatingAdmissionPolicies the API needs beyond CRD schemas (a rule about an object's DELETE cannot be a CRD
// validation): generated as YAML next to the CRDs (admission/) and in the Helm chart, and installed by
// installAdmissionPolicies for the test control plane.
import { STORAGE_GROUP } from '../api/storage.ts';

export const VOLUME_IN_USE_POLICY = 'volume-delete-attached.storage.stratus.io';

/**
 * Cinder refuses to delete an attached volume: DELETE of a Volume whose status.attachments is not empty is denied
 * with Cinder's words. On DELETE the API server gives the policy `oldObject` (object is null).
 */
export function admissionPolicies(name = VOLUME_IN_USE_POLICY): Array<Record<string, unknown>> {
  return [
    {
      apiVersion: 'admissionregistration.k8s.io/v1',
      kind: 'ValidatingAdmissionPolicy',
      metadata: { name },
      spec: {
        failurePolicy: 'Fail',
        matchConstraints: {
          resourceRules: [
            {
              apiGroups: [STORAGE_GROUP],
              apiVersions: ['*'],
              operations: ['DELETE'],
              resources: ['volumes'],
            },
          ],
        },
        validations: [
          {
            expression:
              '!has(oldObject.status) || !has(oldObject.status.attachments) || size(oldObject.status.attachments) == 0',
            messageExpression:
              "'Invalid volume: Volume ' + oldObject.metadata.name + ' is still attached, detach volume first.'",
            reason: 'Invalid',
          },
        ],
      },
    },
    {
      apiVersion: 'admissionregistration.k8s.io/v1',
      kind: 'ValidatingAdmissionPolicyBinding',
      metadata: { name },
      spec: { policyName: name, validationActions: ['Deny'] },
    },
  ];
}
