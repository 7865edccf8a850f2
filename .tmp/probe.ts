import { probeKvmKernel, detectAccelerator } from '/work/main/node-agent/src/qemu/accel.ts';
const kernel = '/tmp/kprobe/x/boot/vmlinuz-6.1.0-57-cloud-amd64';
console.log('tcg', await probeKvmKernel({ qemuBinary: 'qemu-system-x86_64', cpuModel: 'max', kernel, deadlineMs: 60000, accelerator: 'tcg' }));
console.log('kvm', await probeKvmKernel({ qemuBinary: 'qemu-system-x86_64', cpuModel: 'host', kernel, deadlineMs: 15000 }));
console.log(await detectAccelerator({ mode: 'auto', probeKernel: kernel, cacheFile: '/tmp/accel-cache.json' }));
console.log(await detectAccelerator({ mode: 'auto', probeKernel: kernel, cacheFile: '/tmp/accel-cache.json' }));
