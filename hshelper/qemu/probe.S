/* hshelper's KVM probe firmware (hshelper/accel.py embeds the assembled bytes).
 *
 * A broken KVM can run real-mode code and still hang the moment the guest enters
 * protected mode, which is the first thing a kernel does. So the probe goes all the
 * way: real mode -> 32-bit protected mode -> 64-bit long mode (identity-mapped 2 MiB
 * page), then writes 0x31 to qemu's isa-debug-exit port (qemu exits with 99).
 *
 * Rebuild:  as -o probe.o probe.S && ld -Ttext=0xf0000 --oformat binary -o probe.bin probe.o
 * (tests/test_accel.py checks that the embedded bytes match this source.)
 */
	.code16
	.section .text
	.org 0xfe00
start16:
	cli
	movw $0xf000, %ax
	movw %ax, %ds
	lgdtl %ds:(gdtr - 0xf0000)
	movl %cr0, %eax
	orb $1, %al
	movl %eax, %cr0
	ljmpl $0x08, $pm32
	.code32
pm32:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movl $0x2003, 0x1000
	movl $0, 0x1004
	movl $0x3003, 0x2000
	movl $0, 0x2004
	movl $0x83, 0x3000
	movl $0, 0x3004
	movl $0x1000, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax
	movl %eax, %cr4
	movl $0xc0000080, %ecx
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000000, %eax
	movl %eax, %cr0
	ljmp $0x18, $lm64
	.code64
lm64:
	movb $0x31, %al
	outb %al, $0xf4
1:	hlt
	jmp 1b
	.p2align 3
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff
	.quad 0x00cf92000000ffff
	.quad 0x00af9a000000ffff
gdtr:
	.word gdtr - gdt - 1
	.long gdt
	.org 0xfff0
	.code16
	jmp start16
	.org 0x10000, 0xf4
