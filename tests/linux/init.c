// SPDX-License-Identifier: ISC
/*
 * /init of vmd's Linux test guest: a static program without libc, raw system calls only, and
 * no SSE/x87 (built with -mgeneral-regs-only; tests/linux_guest.rs checks its disassembly), so
 * the kernel never has to restore a dirty FPU state for it under kvm_pvm.
 *
 * It prints "linux-guest: ready", then checks each device it finds:
 *   /dev/vda     reports the first byte of sector 0, writes a pattern at PATTERN_OFFSET with
 *                O_DIRECT, fsyncs, reads it back with O_DIRECT  -> "linux-guest: vda ok"
 *   /dev/hwrng   reads entropy from the current hw_random source, if there is one
 *                                                                 -> "linux-guest: rng ok"
 *   eth0         given ip=<address>[/<prefix>] and peer=<address> on the kernel command line
 *                (they reach /init as environment variables), sets the address, brings the
 *                link up and sends ICMP echoes to the peer over a raw socket
 *                                                                 -> "linux-guest: net ok"
 * and forks a child that execs /init again (which exits 42), waits for it -> "linux-guest: fork ok".
 * Then it ends the VM: reboot (LINUX_REBOOT_CMD_RESTART; vmd run exits 75) unless the kernel
 * command line says linux_guest_end=poweroff or linux_guest_end=halt, or
 * linux_guest_end=power-button: wait until the ACPI power button is pressed (the VMM's graceful
 * stop), then power off, as systemd-logind would.
 */

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_pread64 17
#define SYS_pwrite64 18
#define SYS_ioctl 16
#define SYS_socket 41
#define SYS_sendto 44
#define SYS_recvfrom 45
#define SYS_setsockopt 54
#define SYS_fork 57
#define SYS_execve 59
#define SYS_exit 60
#define SYS_wait4 61
#define SYS_fsync 74
#define SYS_mkdir 83
#define SYS_sync 162
#define SYS_mount 165
#define SYS_reboot 169

#define O_RDONLY 0
#define O_RDWR 2
#define O_DIRECT 040000
#define O_CLOEXEC 02000000

#define AF_INET 2
#define SOCK_DGRAM 2
#define SOCK_RAW 3
#define IPPROTO_ICMP 1
#define SOL_SOCKET 1
#define SO_RCVTIMEO 20
#define SIOCGIFFLAGS 0x8913
#define SIOCSIFFLAGS 0x8914
#define SIOCSIFADDR 0x8916
#define SIOCSIFNETMASK 0x891c
#define IFF_UP 0x1
#define ICMP_ECHO 8
#define ICMP_ECHOREPLY 0
#define EAGAIN 11

#define LINUX_REBOOT_MAGIC1 0xfee1dead
#define LINUX_REBOOT_MAGIC2 672274793
#define LINUX_REBOOT_CMD_RESTART 0x01234567
#define LINUX_REBOOT_CMD_HALT 0xcdef0123
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedc

/* Input events (linux/input-event-codes.h): the ACPI button driver reports the power button as
 * a KEY_POWER press on its own event device. */
#define EV_KEY 1
#define KEY_POWER 116
#define MAX_EVENT_DEVICES 8

/* Where the vda pattern goes, and how much of it (the test reads it back from the image). */
#define PATTERN_OFFSET (1L << 20)
#define PATTERN_SIZE 65536
#define PATTERN_BYTE 0xa5
#define CHILD_STATUS 42

typedef unsigned long u64;

static long syscall6(long n, long a, long b, long c, long d, long e, long f)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

#define sys3(n, a, b, c) syscall6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define sys4(n, a, b, c, d) syscall6((n), (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define sys6(n, a, b, c, d, e, f)                                                            \
	syscall6((n), (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), (long)(f))
#define sys5(n, a, b, c, d, e) syscall6((n), (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)

/* The compiler may emit calls to these for loops and struct copies. */
void *memset(void *dest, int c, u64 n)
{
	volatile unsigned char *d = dest;

	while (n--)
		*d++ = (unsigned char)c;
	return dest;
}

void *memcpy(void *dest, const void *src, u64 n)
{
	volatile unsigned char *d = dest;
	const unsigned char *s = src;

	while (n--)
		*d++ = *s++;
	return dest;
}

static u64 length(const char *s)
{
	u64 n = 0;

	while (s[n])
		n++;
	return n;
}

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

static void print(const char *s)
{
	sys3(SYS_write, 1, s, length(s));
}

/* "linux-guest: <a><b>\n" in one write, so lines never interleave. */
static void say(const char *a, const char *b)
{
	char line[256];
	u64 n = 0;
	const char *parts[] = { "linux-guest: ", a, b, "\n" };

	for (int p = 0; p < 4; p++)
		for (const char *s = parts[p]; *s && n < sizeof(line) - 1; s++)
			line[n++] = *s;
	sys3(SYS_write, 1, line, n);
}

static const char *decimal(long value, char *buf)
{
	char *p = buf + 23;
	int negative = value < 0;
	u64 v = negative ? -(u64)value : (u64)value;

	*p = 0;
	do {
		*--p = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	if (negative)
		*--p = '-';
	return p;
}

static void fail(const char *what, long err)
{
	char buf[24];
	char line[128];
	u64 n = 0;

	for (const char *s = what; *s && n < 100; s++)
		line[n++] = *s;
	line[n] = 0;
	print("linux-guest: FAILED ");
	print(line);
	print(" (");
	print(decimal(err, buf));
	print(")\n");
}

/* Reads a small file (e.g. from /proc or /sys) into buf without its trailing newline. */
static int read_text(const char *path, char *buf, u64 size)
{
	long fd = sys3(SYS_open, path, O_RDONLY | O_CLOEXEC, 0);
	long n;

	if (fd < 0)
		return (int)fd;
	n = sys3(SYS_read, fd, buf, size - 1);
	sys3(SYS_close, fd, 0, 0);
	if (n < 0)
		return (int)n;
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == 0))
		n--;
	buf[n] = 0;
	return 0;
}

static unsigned char block[PATTERN_SIZE] __attribute__((aligned(4096)));

static void check_vda(void)
{
	static const char hex[] = "0123456789abcdef";
	char first[3];
	long fd = sys3(SYS_open, "/dev/vda", O_RDWR | O_DIRECT | O_CLOEXEC, 0);
	long n;

	if (fd < 0) {
		say("no /dev/vda", "");
		return;
	}
	n = sys4(SYS_pread64, fd, block, 4096, 0);
	if (n != 4096) {
		fail("vda: read of sector 0", n);
		goto out;
	}
	first[0] = hex[block[0] >> 4];
	first[1] = hex[block[0] & 15];
	first[2] = 0;
	say("vda first byte ", first);

	memset(block, PATTERN_BYTE, PATTERN_SIZE);
	n = sys4(SYS_pwrite64, fd, block, PATTERN_SIZE, PATTERN_OFFSET);
	if (n != PATTERN_SIZE) {
		fail("vda: write", n);
		goto out;
	}
	n = sys3(SYS_fsync, fd, 0, 0);
	if (n != 0) {
		fail("vda: fsync", n);
		goto out;
	}
	memset(block, 0, PATTERN_SIZE);
	n = sys4(SYS_pread64, fd, block, PATTERN_SIZE, PATTERN_OFFSET);
	if (n != PATTERN_SIZE) {
		fail("vda: read back", n);
		goto out;
	}
	for (u64 i = 0; i < PATTERN_SIZE; i++) {
		if (block[i] != PATTERN_BYTE) {
			fail("vda: pattern differs at byte", (long)i);
			goto out;
		}
	}
	sys3(SYS_sync, 0, 0, 0);
	say("vda ok", "");
out:
	sys3(SYS_close, fd, 0, 0);
}

static void check_rng(void)
{
	char source[64];
	unsigned char bytes[64];
	long fd, n, got = 0;
	int nonzero = 0;

	/* /dev/hwrng is there whenever the hw_random core is; a source only with a device. */
	if (read_text("/sys/class/misc/hw_random/rng_current", source, sizeof(source)) != 0 ||
	    !source[0] || starts_with(source, "none")) {
		say("no hwrng source", "");
		return;
	}
	say("hwrng source ", source);
	fd = sys3(SYS_open, "/dev/hwrng", O_RDONLY | O_CLOEXEC, 0);
	if (fd < 0) {
		fail("rng: open /dev/hwrng", fd);
		return;
	}
	while (got < (long)sizeof(bytes)) {
		n = sys3(SYS_read, fd, bytes + got, sizeof(bytes) - got);
		if (n <= 0) {
			fail("rng: read", n);
			sys3(SYS_close, fd, 0, 0);
			return;
		}
		got += n;
	}
	sys3(SYS_close, fd, 0, 0);
	for (u64 i = 0; i < sizeof(bytes); i++)
		nonzero |= bytes[i];
	if (!nonzero) {
		fail("rng: 64 zero bytes", 0);
		return;
	}
	say("rng ok", "");
}

/* struct sockaddr_in; addresses in network byte order (the bytes a, b, c, d in that order). */
struct sockaddr_in {
	unsigned short family;
	unsigned short port;
	unsigned int addr;
	unsigned char zero[8];
};

/* struct ifreq, with the two members of its union that /init uses. */
struct ifreq {
	char name[16];
	union {
		struct sockaddr_in addr;
		short flags;
		char pad[24];
	};
};

struct timeval {
	long sec;
	long usec;
};

/* How many echoes /init sends at most, and how long it waits for each answer. */
#define ECHO_TRIES 5
#define ECHO_WAIT_SECONDS 2
#define ECHO_ID 0x4c47

/* "a.b.c.d" (with "/prefix" if prefix is not null) -> 0, or -1 if it is not one. */
static int parse_ipv4(const char *s, unsigned int *addr, int *prefix)
{
	unsigned int result = 0;

	for (int part = 0; part < 4; part++) {
		unsigned int value = 0;
		int digits = 0;

		while (*s >= '0' && *s <= '9' && digits < 3) {
			value = value * 10 + (unsigned int)(*s++ - '0');
			digits++;
		}
		if (!digits || value > 255)
			return -1;
		result |= value << (8 * part);
		if (part < 3 && *s++ != '.')
			return -1;
	}
	if (prefix && *s == '/') {
		int value = 0, digits = 0;

		s++;
		while (*s >= '0' && *s <= '9' && digits < 2) {
			value = value * 10 + (*s++ - '0');
			digits++;
		}
		if (!digits || value < 1 || value > 30)
			return -1;
		*prefix = value;
	}
	if (*s)
		return -1;
	*addr = result;
	return 0;
}

static unsigned short checksum(const unsigned char *data, u64 len)
{
	unsigned long sum = 0;

	for (u64 i = 0; i + 1 < len; i += 2)
		sum += (unsigned long)data[i] | ((unsigned long)data[i + 1] << 8);
	if (len & 1)
		sum += data[len - 1];
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (unsigned short)~sum;
}

static int interface_request(long fd, unsigned long request, struct ifreq *ifr, const char *what)
{
	long ret = sys3(SYS_ioctl, fd, request, ifr);

	if (ret < 0) {
		fail(what, ret);
		return -1;
	}
	return 0;
}

/* Gives eth0 its address and netmask and brings it up. */
static int configure_eth0(unsigned int addr, int prefix)
{
	struct ifreq ifr;
	long fd = sys3(SYS_socket, AF_INET, SOCK_DGRAM, 0);
	int ret = -1;

	if (fd < 0) {
		fail("net: socket for eth0", fd);
		return -1;
	}
	memset(&ifr, 0, sizeof(ifr));
	memcpy(ifr.name, "eth0", 5);
	ifr.addr.family = AF_INET;
	ifr.addr.addr = addr;
	if (interface_request(fd, SIOCSIFADDR, &ifr, "net: set eth0's address"))
		goto out;
	/* The netmask's first `prefix` bits, in network byte order. */
	ifr.addr.addr = 0;
	for (int bit = 0; bit < prefix; bit++)
		ifr.addr.addr |= 1u << (8 * (bit / 8) + 7 - bit % 8);
	if (interface_request(fd, SIOCSIFNETMASK, &ifr, "net: set eth0's netmask"))
		goto out;
	if (interface_request(fd, SIOCGIFFLAGS, &ifr, "net: read eth0's flags"))
		goto out;
	ifr.flags |= IFF_UP;
	if (interface_request(fd, SIOCSIFFLAGS, &ifr, "net: bring eth0 up"))
		goto out;
	ret = 0;
out:
	sys3(SYS_close, fd, 0, 0);
	return ret;
}

/* Sends up to ECHO_TRIES echoes to `peer`; returns the sequence number answered, or -1. */
static long ping(unsigned int peer)
{
	struct sockaddr_in to = { .family = AF_INET, .addr = peer };
	struct timeval wait = { .sec = ECHO_WAIT_SECONDS };
	unsigned char packet[64];
	unsigned char reply[1500];
	long fd = sys3(SYS_socket, AF_INET, SOCK_RAW, IPPROTO_ICMP);
	long answered = -1;

	if (fd < 0) {
		fail("net: raw ICMP socket", fd);
		return -1;
	}
	long ret = sys5(SYS_setsockopt, fd, SOL_SOCKET, SO_RCVTIMEO, &wait, sizeof(wait));
	if (ret < 0) {
		fail("net: SO_RCVTIMEO", ret);
		goto out;
	}
	for (int seq = 1; seq <= ECHO_TRIES && answered < 0; seq++) {
		unsigned short sum;

		/* type, code, checksum, identifier, sequence (big-endian), then a payload. */
		memset(packet, 0, sizeof(packet));
		packet[0] = ICMP_ECHO;
		packet[4] = ECHO_ID >> 8;
		packet[5] = ECHO_ID & 0xff;
		packet[7] = (unsigned char)seq;
		for (u64 i = 8; i < sizeof(packet); i++)
			packet[i] = (unsigned char)i;
		sum = checksum(packet, sizeof(packet));
		packet[2] = (unsigned char)(sum & 0xff);
		packet[3] = (unsigned char)(sum >> 8);
		ret = sys6(SYS_sendto, fd, packet, sizeof(packet), 0, &to, sizeof(to));
		if (ret != (long)sizeof(packet)) {
			fail("net: send an echo", ret);
			goto out;
		}
		/* A raw socket sees every ICMP packet: wait for our answer, until a timeout. */
		for (;;) {
			long n = sys6(SYS_recvfrom, fd, reply, sizeof(reply), 0, 0, 0);
			u64 header;

			if (n == -EAGAIN)
				break;
			if (n < 0) {
				fail("net: receive", n);
				goto out;
			}
			if (n < 20)
				continue;
			header = (u64)(reply[0] & 0xf) * 4;
			if ((u64)n < header + 8 || *(unsigned int *)(reply + 12) != peer)
				continue;
			if (reply[header] == ICMP_ECHOREPLY && reply[header + 4] == (ECHO_ID >> 8) &&
			    reply[header + 5] == (ECHO_ID & 0xff) && reply[header + 7] == seq) {
				answered = seq;
				break;
			}
		}
	}
out:
	sys3(SYS_close, fd, 0, 0);
	return answered;
}

static void check_net(char **envp)
{
	char state[32];
	char buf[24];
	const char *ip = 0, *peer = 0;
	unsigned int addr, peer_addr;
	int prefix = 24;
	long answered;

	if (read_text("/sys/class/net/eth0/operstate", state, sizeof(state)) != 0) {
		say("no eth0, net check skipped", "");
		return;
	}
	for (char **e = envp; *e; e++) {
		if (starts_with(*e, "ip="))
			ip = *e + 3;
		else if (starts_with(*e, "peer="))
			peer = *e + 5;
	}
	if (!ip || !peer) {
		say("eth0 present, but no ip= and peer= on the command line: net check skipped", "");
		return;
	}
	if (parse_ipv4(ip, &addr, &prefix) || parse_ipv4(peer, &peer_addr, 0)) {
		fail("net: ip= or peer= is not an IPv4 address", 0);
		return;
	}
	if (configure_eth0(addr, prefix))
		return;
	say("eth0 up, address ", ip);
	answered = ping(peer_addr);
	if (answered < 0) {
		fail("net: no answer from the peer", ECHO_TRIES);
		return;
	}
	say("net: echo answered by ", peer);
	say("net: answered echo number ", decimal(answered, buf));
	say("net ok", "");
}

static void check_fork(char *self)
{
	char *argv[] = { self, "child", 0 };
	char *envp[] = { 0 };
	int status = 0;
	long pid = sys3(SYS_fork, 0, 0, 0);

	if (pid == 0) {
		sys3(SYS_execve, "/init", argv, envp);
		sys3(SYS_exit, 127, 0, 0);
	}
	if (pid < 0) {
		fail("fork", pid);
		return;
	}
	long waited = sys4(SYS_wait4, pid, &status, 0, 0);
	if (waited != pid) {
		fail("wait4", waited);
		return;
	}
	/* Exited normally with CHILD_STATUS: the child ran /init again. */
	if ((status & 0x7f) != 0 || ((status >> 8) & 0xff) != CHILD_STATUS) {
		fail("fork: child status", status);
		return;
	}
	say("fork ok", "");
}

/* struct input_event on x86-64. */
struct input_event {
	long tv_sec;
	long tv_usec;
	unsigned short type;
	unsigned short code;
	int value;
};

/*
 * Waits for a press of the ACPI power button: finds the event device whose name is the ACPI
 * button driver's ("Power Button"), then reads events until KEY_POWER goes down. Returns 0 then,
 * or -1 without such a device.
 */
static int wait_for_power_button(void)
{
	char name_path[] = "/sys/class/input/event0/device/name";
	char device_path[] = "/dev/input/event0";
	char name[64];
	struct input_event event;
	long fd = -1;
	long n;

	for (int i = 0; i < MAX_EVENT_DEVICES && fd < 0; i++) {
		name_path[length("/sys/class/input/event")] = (char)('0' + i);
		device_path[length("/dev/input/event")] = (char)('0' + i);
		if (read_text(name_path, name, sizeof(name)) != 0 || !starts_with(name, "Power Button"))
			continue;
		fd = sys3(SYS_open, device_path, O_RDONLY | O_CLOEXEC, 0);
		if (fd < 0)
			fail("open the power button's event device", fd);
	}
	if (fd < 0) {
		say("no power button", "");
		return -1;
	}
	say("waiting for the power button", "");
	for (;;) {
		n = sys3(SYS_read, fd, &event, sizeof(event));
		if (n != (long)sizeof(event)) {
			fail("read the power button's events", n);
			sys3(SYS_close, fd, 0, 0);
			return -1;
		}
		if (event.type == EV_KEY && event.code == KEY_POWER && event.value == 1)
			break;
	}
	sys3(SYS_close, fd, 0, 0);
	say("power button pressed", "");
	return 0;
}

static void init_main(long argc, char **argv, char **envp)
{
	int power_button = 0;
	char uptime[64];
	unsigned int end = LINUX_REBOOT_CMD_RESTART;

	if (argc > 1 && starts_with(argv[1], "child"))
		sys3(SYS_exit, CHILD_STATUS, 0, 0);

	for (char **e = envp; *e; e++) {
		if (starts_with(*e, "linux_guest_end=poweroff"))
			end = LINUX_REBOOT_CMD_POWER_OFF;
		else if (starts_with(*e, "linux_guest_end=halt"))
			end = LINUX_REBOOT_CMD_HALT;
		else if (starts_with(*e, "linux_guest_end=power-button"))
			power_button = 1;
	}

	sys3(SYS_mkdir, "/dev", 0755, 0);
	sys3(SYS_mkdir, "/proc", 0555, 0);
	sys3(SYS_mkdir, "/sys", 0555, 0);
	sys5(SYS_mount, "devtmpfs", "/dev", "devtmpfs", 0, 0);
	sys5(SYS_mount, "proc", "/proc", "proc", 0, 0);
	sys5(SYS_mount, "sysfs", "/sys", "sysfs", 0, 0);

	if (read_text("/proc/uptime", uptime, sizeof(uptime)) == 0)
		say("ready, uptime ", uptime);
	else
		say("ready", "");

	check_vda();
	check_rng();
	check_net(envp);
	check_fork(argv[0]);

	say("done", "");
	if (power_button)
		end = wait_for_power_button() == 0 ? LINUX_REBOOT_CMD_POWER_OFF : LINUX_REBOOT_CMD_HALT;
	sys3(SYS_sync, 0, 0, 0);
	sys4(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, end, 0);
	fail("reboot", 0);
	for (;;)
		sys3(SYS_exit, 1, 0, 0);
}

/* Entry: the stack holds argc, argv[], NULL, envp[], NULL. */
__attribute__((used, noreturn)) void start_c(long *stack)
{
	long argc = stack[0];
	char **argv = (char **)(stack + 1);

	init_main(argc, argv, argv + argc + 1);
	for (;;)
		sys3(SYS_exit, 1, 0, 0);
}

__asm__(".globl _start\n"
	"_start:\n"
	"	xor %ebp, %ebp\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call start_c\n"
	"	hlt\n");
