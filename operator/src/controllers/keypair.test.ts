import { describe, expect, it } from 'vitest';
import { sshFingerprint } from './keypair.ts';

// Fingerprints printed by `ssh-keygen -l -E sha256 -f key.pub` (OpenSSH 9.2); the comparison with a freshly generated
// key runs ssh-keygen and lives in operator/test/integration/keypair.test.ts.
describe('sshFingerprint', () => {
  it('matches ssh-keygen -l for known ed25519 and rsa keys', () => {
    expect(sshFingerprint('ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOnAUxUFiMDbktLR6PMlkn25RULK/9rBKjJz3M67CAvs x@y')).toBe(
      'SHA256:8EKHucbHv0wUfQBS7ZH4eqvTLSqJ2QANRgYKq6DArt0',
    );
    expect(
      sshFingerprint(
        'ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQCpfKVHpKYp64n+9Pc0w7TvukNqlLJ9zsxzadzjCHH64tiHGcdDL5P0jagYaMPRIgbWIUM7ZAu3U/zRt5fttQXI0tvZOPD2XZD8wsH7bdk0yh8ykC2CN6aY+YpX+P4tviz9RMngGaRH+7YY20Oz515Yk+/PRaA+LTn6NqSbnu+Z/w== r',
      ),
    ).toBe('SHA256:vrKNBXuQHZtLlXt6FCfPi6LD5VZ9FVVJrXJK/GjXfro');
  });
  it('refuses a blob whose embedded type differs or that is not base64 of a key', () => {
    const ed = 'AAAAC3NzaC1lZDI1NTE5AAAAIAmz3JDWliYPOvngSOOj7kbnvOx8hgyJugms5NIm/MrM';
    expect(sshFingerprint(`ssh-ed25519 ${ed} c`)).toBe('SHA256:JbiBLli340LFUENx6Dkh6g+fL62+BwwUxnUP/c01U8k');
    expect(sshFingerprint(`ssh-rsa ${ed} c`)).toBeUndefined();
    expect(sshFingerprint('ssh-ed25519 AAAA')).toBeUndefined();
  });
});
