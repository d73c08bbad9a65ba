/*!
 * \file load_checks.cc
 * \brief Checks made before a compiled library is opened, the trust policy, and the guard
 *        against a second copy of this runtime library in one process.
 */
#include "load_checks.h"

#include <c10/util/Exception.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace tvm_torch {

// ---- JSON nesting ----

void CheckJsonDepth(const std::string& text, const char* what) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // the escaped character cannot end the string
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      TORCH_CHECK(++depth <= kMaxJsonDepth, "tvm_class: ", what, " nests deeper than ",
                  kMaxJsonDepth, " levels; it is corrupted or crafted, not written by "
                  "tvm.contrib.torch");
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}

// ---- SHA-256 (FIPS 180-4) ----

namespace {

constexpr std::array<uint32_t, 64> kSha256K = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

inline uint32_t Rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

void Sha256Block(uint32_t state[8], const unsigned char* block) {
  uint32_t w[64];
  for (int i = 0; i < 16; ++i) {
    w[i] = (uint32_t{block[4 * i]} << 24) | (uint32_t{block[4 * i + 1]} << 16) |
           (uint32_t{block[4 * i + 2]} << 8) | uint32_t{block[4 * i + 3]};
  }
  for (int i = 16; i < 64; ++i) {
    uint32_t s0 = Rotr(w[i - 15], 7) ^ Rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
    uint32_t s1 = Rotr(w[i - 2], 17) ^ Rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
  uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
  for (int i = 0; i < 64; ++i) {
    uint32_t t1 = h + (Rotr(e, 6) ^ Rotr(e, 11) ^ Rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                  kSha256K[i] + w[i];
    uint32_t t2 = (Rotr(a, 2) ^ Rotr(a, 13) ^ Rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    h = g;
    g = f;
    f = e;
    e = d + t1;
    d = c;
    c = b;
    b = a;
    a = t1 + t2;
  }
  state[0] += a;
  state[1] += b;
  state[2] += c;
  state[3] += d;
  state[4] += e;
  state[5] += f;
  state[6] += g;
  state[7] += h;
}

#if defined(__x86_64__)
/*! \brief The same compression with the x86 SHA extensions (several times faster). */
__attribute__((target("sha,sse4.1,ssse3"))) void Sha256BlocksShaNi(uint32_t state[8],
                                                                   const unsigned char* data,
                                                                   size_t blocks) {
  const __m128i mask = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  __m128i tmp = _mm_loadu_si128(reinterpret_cast<const __m128i*>(&state[0]));
  __m128i state1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(&state[4]));
  tmp = _mm_shuffle_epi32(tmp, 0xB1);                // CDAB
  state1 = _mm_shuffle_epi32(state1, 0x1B);          // EFGH
  __m128i state0 = _mm_alignr_epi8(tmp, state1, 8);  // ABEF
  state1 = _mm_blend_epi16(state1, tmp, 0xF0);       // CDGH
  for (; blocks > 0; --blocks, data += 64) {
    const __m128i abef = state0, cdgh = state1;
    __m128i msg[4];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      if (i < 4) {
        msg[i] = _mm_shuffle_epi8(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(data + 16 * i)), mask);
      }
      __m128i m = _mm_add_epi32(
          msg[i % 4], _mm_loadu_si128(reinterpret_cast<const __m128i*>(&kSha256K[4 * i])));
      state1 = _mm_sha256rnds2_epu32(state1, state0, m);
      if (i >= 3 && i < 15) {
        __m128i t = _mm_alignr_epi8(msg[i % 4], msg[(i + 3) % 4], 4);
        msg[(i + 1) % 4] = _mm_sha256msg2_epu32(_mm_add_epi32(msg[(i + 1) % 4], t), msg[i % 4]);
      }
      m = _mm_shuffle_epi32(m, 0x0E);
      state0 = _mm_sha256rnds2_epu32(state0, state1, m);
      if (i >= 1 && i < 13) msg[(i + 3) % 4] = _mm_sha256msg1_epu32(msg[(i + 3) % 4], msg[i % 4]);
    }
    state0 = _mm_add_epi32(state0, abef);
    state1 = _mm_add_epi32(state1, cdgh);
  }
  tmp = _mm_shuffle_epi32(state0, 0x1B);        // FEBA
  state1 = _mm_shuffle_epi32(state1, 0xB1);     // DCHG
  state0 = _mm_blend_epi16(tmp, state1, 0xF0);  // DCBA
  state1 = _mm_alignr_epi8(state1, tmp, 8);     // ABEF
  _mm_storeu_si128(reinterpret_cast<__m128i*>(&state[0]), state0);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(&state[4]), state1);
}
#endif

void Sha256BlocksPortable(uint32_t state[8], const unsigned char* data, size_t blocks) {
  for (; blocks > 0; --blocks, data += 64) Sha256Block(state, data);
}

using BlocksFn = void (*)(uint32_t*, const unsigned char*, size_t);

std::string Sha256With(BlocksFn blocks_fn, const std::string& bytes);

/*! \brief SHA-NI when the CPU has it and it gives the right digest, else the portable code. */
BlocksFn Sha256Blocks() {
  static const BlocksFn chosen = [] {
#if defined(__x86_64__)
    unsigned int a = 0, b = 0, c = 0, d = 0;
    const bool sse41 = __get_cpuid(1, &a, &b, &c, &d) && ((c >> 19) & 1) && ((c >> 9) & 1);
    const bool sha = __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((b >> 29) & 1);
    if (sse41 && sha) {
      const std::string probe(1000, 'a');
      if (Sha256With(Sha256BlocksShaNi, probe) == Sha256With(Sha256BlocksPortable, probe)) {
        return static_cast<BlocksFn>(Sha256BlocksShaNi);
      }
    }
#endif
    return static_cast<BlocksFn>(Sha256BlocksPortable);
  }();
  return chosen;
}

std::string Sha256With(BlocksFn blocks_fn, const std::string& bytes) {
  uint32_t state[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                       0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t size = bytes.size();
  const size_t done = size / 64 * 64;
  blocks_fn(state, data, size / 64);
  unsigned char tail[128] = {0};
  const size_t rest = size - done;
  std::memcpy(tail, data + done, rest);
  tail[rest] = 0x80;
  const size_t tail_size = rest + 1 + 8 <= 64 ? 64 : 128;
  const uint64_t bits = static_cast<uint64_t>(size) * 8;
  for (int i = 0; i < 8; ++i) tail[tail_size - 1 - i] = static_cast<unsigned char>(bits >> (8 * i));
  blocks_fn(state, tail, tail_size / 64);
  char hex[65];
  for (int i = 0; i < 8; ++i) std::snprintf(hex + 8 * i, 9, "%08x", state[i]);
  return std::string(hex, 64);
}

}  // namespace

std::string Sha256Hex(const std::string& bytes) { return Sha256With(Sha256Blocks(), bytes); }

// ---- ELF image ----

namespace {

[[noreturn]] void NotALibrary(const std::string& why) {
  TORCH_CHECK(false, "tvm_class: the compiled library is not a complete shared library for "
              "this machine (", why, "); the saved model is corrupted, truncated or was built "
              "for another platform");
}

/*! \brief Whether [offset, offset + size) lies inside `total` bytes, without overflow. */
bool InRange(uint64_t offset, uint64_t size, uint64_t total) {
  return offset <= total && size <= total - offset;
}

}  // namespace

void CheckElfImage(const std::string& image) {
  const uint64_t total = image.size();
  if (total < sizeof(Elf64_Ehdr)) NotALibrary("it is " + std::to_string(total) + " bytes");
  Elf64_Ehdr eh;
  std::memcpy(&eh, image.data(), sizeof(eh));
  if (std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0) NotALibrary("no ELF header");
  if (eh.e_ident[EI_CLASS] != ELFCLASS64) NotALibrary("not a 64-bit ELF file");
  if (eh.e_ident[EI_DATA] != ELFDATA2LSB) NotALibrary("not little-endian");
  if (eh.e_type != ET_DYN) NotALibrary("not a shared object (ELF type " +
                                       std::to_string(eh.e_type) + ")");
#if defined(__x86_64__)
  if (eh.e_machine != EM_X86_64) {
    NotALibrary("built for ELF machine " + std::to_string(eh.e_machine) + ", not x86-64");
  }
#elif defined(__aarch64__)
  if (eh.e_machine != EM_AARCH64) {
    NotALibrary("built for ELF machine " + std::to_string(eh.e_machine) + ", not AArch64");
  }
#endif
  if (eh.e_phnum == 0 || eh.e_phentsize != sizeof(Elf64_Phdr) ||
      !InRange(eh.e_phoff, uint64_t{eh.e_phnum} * sizeof(Elf64_Phdr), total)) {
    NotALibrary("its program header table is missing or lies outside the " +
                std::to_string(total) + " bytes");
  }
  bool has_dynamic = false;
  for (uint16_t i = 0; i < eh.e_phnum; ++i) {
    Elf64_Phdr ph;
    std::memcpy(&ph, image.data() + eh.e_phoff + i * sizeof(Elf64_Phdr), sizeof(ph));
    has_dynamic |= ph.p_type == PT_DYNAMIC;
    if (ph.p_type != PT_NULL && !InRange(ph.p_offset, ph.p_filesz, total)) {
      NotALibrary("segment " + std::to_string(i) + " ends at byte " +
                  std::to_string(ph.p_offset + ph.p_filesz) + " of " + std::to_string(total));
    }
  }
  if (!has_dynamic) NotALibrary("it has no dynamic segment");
  if (eh.e_shnum != 0) {
    if (eh.e_shentsize != sizeof(Elf64_Shdr) ||
        !InRange(eh.e_shoff, uint64_t{eh.e_shnum} * sizeof(Elf64_Shdr), total)) {
      NotALibrary("its section header table lies outside the " + std::to_string(total) +
                  " bytes");
    }
    for (uint16_t i = 0; i < eh.e_shnum; ++i) {
      Elf64_Shdr sh;
      std::memcpy(&sh, image.data() + eh.e_shoff + i * sizeof(Elf64_Shdr), sizeof(sh));
      if (sh.sh_type != SHT_NOBITS && sh.sh_type != SHT_NULL &&
          !InRange(sh.sh_offset, sh.sh_size, total)) {
        NotALibrary("section " + std::to_string(i) + " ends at byte " +
                    std::to_string(sh.sh_offset + sh.sh_size) + " of " + std::to_string(total));
      }
    }
  }
}

// ---- CPU features ----

namespace {

/*!
 * \brief Where CPUID reports an LLVM feature, and which OS-enabled state it needs. Only the
 *        features LLVM's code generation can use for computation (vector and bit-manipulation
 *        extensions) are listed: system instructions (mwaitx, pku, rdpru, ...) that a CPU
 *        model name implies are often hidden by hypervisors and never emitted for a kernel.
 */
struct CpuidFeature {
  const char* name;
  uint32_t leaf, subleaf;
  int reg;  // 0 eax, 1 ebx, 2 ecx, 3 edx
  int bit;
  int state;  // 0 none, 1 AVX (XCR0 bits 1-2), 2 AVX-512 (bits 1-2, 5-7), 3 AMX (bits 17-18)
};

constexpr CpuidFeature kCpuidFeatures[] = {
    {"sse3", 1, 0, 2, 0, 0},
    {"ssse3", 1, 0, 2, 9, 0},
    {"fma", 1, 0, 2, 12, 1},
    {"cx16", 1, 0, 2, 13, 0},
    {"sse4.1", 1, 0, 2, 19, 0},
    {"sse4.2", 1, 0, 2, 20, 0},
    {"movbe", 1, 0, 2, 22, 0},
    {"popcnt", 1, 0, 2, 23, 0},
    {"avx", 1, 0, 2, 28, 1},
    {"f16c", 1, 0, 2, 29, 1},
    {"cx8", 1, 0, 3, 8, 0},
    {"cmov", 1, 0, 3, 15, 0},
    {"mmx", 1, 0, 3, 23, 0},
    {"fxsr", 1, 0, 3, 24, 0},
    {"sse", 1, 0, 3, 25, 0},
    {"sse2", 1, 0, 3, 26, 0},
    {"bmi", 7, 0, 1, 3, 0},
    {"avx2", 7, 0, 1, 5, 1},
    {"bmi2", 7, 0, 1, 8, 0},
    {"avx512f", 7, 0, 1, 16, 2},
    {"avx512dq", 7, 0, 1, 17, 2},
    {"adx", 7, 0, 1, 19, 0},
    {"avx512ifma", 7, 0, 1, 21, 2},
    {"avx512cd", 7, 0, 1, 28, 2},
    {"avx512bw", 7, 0, 1, 30, 2},
    {"avx512vl", 7, 0, 1, 31, 2},
    {"avx512vbmi", 7, 0, 2, 1, 2},
    {"avx512vbmi2", 7, 0, 2, 6, 2},
    {"gfni", 7, 0, 2, 8, 0},
    {"avx512vnni", 7, 0, 2, 11, 2},
    {"avx512bitalg", 7, 0, 2, 12, 2},
    {"avx512vpopcntdq", 7, 0, 2, 14, 2},
    {"avx512vp2intersect", 7, 0, 3, 8, 2},
    {"amx-bf16", 7, 0, 3, 22, 3},
    {"avx512fp16", 7, 0, 3, 23, 2},
    {"amx-tile", 7, 0, 3, 24, 3},
    {"amx-int8", 7, 0, 3, 25, 3},
    {"avxvnni", 7, 1, 0, 4, 1},
    {"avx512bf16", 7, 1, 0, 5, 2},
    {"cmpccxadd", 7, 1, 0, 7, 0},
    {"amx-fp16", 7, 1, 0, 21, 3},
    {"avxifma", 7, 1, 0, 23, 1},
    {"avxvnniint8", 7, 1, 3, 4, 1},
    {"avxneconvert", 7, 1, 3, 5, 1},
    {"avxvnniint16", 7, 1, 3, 10, 1},
    {"sahf", 0x80000001, 0, 2, 0, 0},
    {"lzcnt", 0x80000001, 0, 2, 5, 0},
    {"sse4a", 0x80000001, 0, 2, 6, 0},
    {"xop", 0x80000001, 0, 2, 11, 1},
    {"fma4", 0x80000001, 0, 2, 16, 1},
    {"64bit", 0x80000001, 0, 3, 29, 0},
};

#if defined(__x86_64__) || defined(__i386__)
bool HostHas(const CpuidFeature& f) {
  unsigned int regs[4] = {0, 0, 0, 0};
  if (!__get_cpuid_count(f.leaf, f.subleaf, &regs[0], &regs[1], &regs[2], &regs[3])) {
    return false;
  }
  if (!((regs[f.reg] >> f.bit) & 1)) return false;
  if (f.state == 0) return true;
  unsigned int a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // no OSXSAVE
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const uint64_t xcr0 = (uint64_t{hi} << 32) | lo;
  const uint64_t need = f.state == 1 ? 0x6 : f.state == 2 ? 0xe6 : 0x60000;
  return (xcr0 & need) == need;
}
#endif

}  // namespace

std::vector<std::string> MissingCpuFeatures(const std::vector<std::string>& required) {
  std::vector<std::string> missing;
#if defined(__x86_64__) || defined(__i386__)
  for (const std::string& name : required) {
    for (const CpuidFeature& f : kCpuidFeatures) {
      if (name == f.name) {
        if (!HostHas(f)) missing.push_back(name);
        break;
      }
    }
  }
#endif
  return missing;
}

// ---- Trust policy ----

namespace {

/*! \brief Environment variable: a file of digests, or digests separated by commas/spaces. */
constexpr const char* kTrustEnv = "TVM_TORCH_TRUSTED_LIBRARIES";

std::mutex trust_mutex;
/*! \brief Set by SetTrustedLibraries; unset means "read the environment". */
std::optional<std::vector<std::string>> trust_api_digests;

bool IsDigest(const std::string& token) {
  return token.size() == 64 &&
         std::all_of(token.begin(), token.end(),
                     [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; });
}

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::vector<std::string> Tokens(const std::string& text) {
  std::vector<std::string> out;
  std::string token;
  for (char c : text) {
    if (c == ',' || c == ';' || std::isspace(static_cast<unsigned char>(c))) {
      if (!token.empty()) out.push_back(token);
      token.clear();
    } else {
      token += c;
    }
  }
  if (!token.empty()) out.push_back(token);
  return out;
}

/*! \brief The policy of $TVM_TORCH_TRUSTED_LIBRARIES; throws when it cannot be read. */
std::optional<std::vector<std::string>> PolicyFromEnvironment() {
  const char* value = std::getenv(kTrustEnv);
  if (value == nullptr || *value == '\0') return std::nullopt;
  std::vector<std::string> tokens = Tokens(value);
  const bool listed = !tokens.empty() && std::all_of(tokens.begin(), tokens.end(), IsDigest);
  std::vector<std::string> digests;
  if (listed) {
    for (const std::string& t : tokens) digests.push_back(Lower(t));
    return digests;
  }
  // A file: one digest at the start of each line (sha256sum's output works); '#' comments.
  std::string text;
  try {
    text = ReadRegularFile(value, "trusted-library list", uint64_t{1} << 24);
  } catch (const c10::Error& err) {
    TORCH_CHECK(false, "tvm_class: $", kTrustEnv, " is set to '", value, "', which is neither "
                "a list of SHA-256 digests nor a readable file of them (",
                err.what_without_backtrace(), "); no compiled library is loaded until it is fixed");
  }
  size_t start = 0;
  int line_no = 0;
  while (start <= text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(start, end - start);
    ++line_no;
    start = end + 1;
    line = line.substr(0, line.find('#'));
    std::vector<std::string> words = Tokens(line);
    if (words.empty()) continue;
    // sha256sum marks binary-mode names with '*' after the digest's separator; only the
    // first word is read.
    TORCH_CHECK(IsDigest(words[0]), "tvm_class: ", value, " line ", line_no, ": '", words[0],
                "' is not a SHA-256 digest (64 hex digits); the trusted-library list is "
                "unusable, so no compiled library is loaded");
    digests.push_back(Lower(words[0]));
  }
  return digests;
}

}  // namespace

std::optional<std::vector<std::string>> TrustedLibraries() {
  {
    std::lock_guard<std::mutex> lock(trust_mutex);
    if (trust_api_digests.has_value()) return trust_api_digests;
  }
  return PolicyFromEnvironment();
}

void SetTrustedLibraries(std::optional<std::vector<std::string>> digests) {
  if (digests.has_value()) {
    for (std::string& d : *digests) {
      TORCH_CHECK(IsDigest(d), "tvm_class: '", d, "' is not a SHA-256 digest (64 hex digits)");
      d = Lower(d);
    }
  }
  std::lock_guard<std::mutex> lock(trust_mutex);
  trust_api_digests = std::move(digests);
}

void CheckTrustedLibrary(const std::string& sha256) {
  std::optional<std::vector<std::string>> trusted = TrustedLibraries();
  if (!trusted.has_value()) return;
  TORCH_CHECK(std::find(trusted->begin(), trusted->end(), sha256) != trusted->end(),
              "tvm_class: refusing to load a compiled library that is not trusted: its SHA-256 "
              "is ", sha256, ", which is not among the ", trusted->size(), " trusted digest(s) "
              "(set by $", kTrustEnv, " or tvm.contrib.torch.set_trusted_libraries). A saved "
              "TVM module holds native code that runs when it is loaded: add this digest only "
              "if you trust where the file came from");
}

// ---- Files ----

std::string ReadRegularFile(const std::string& path, const char* what, uint64_t max_bytes) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  TORCH_CHECK(fd >= 0, "tvm_class: cannot open the ", what, " file '", path, "': ",
              std::strerror(errno));
  struct FdCloser {
    int fd;
    ~FdCloser() { close(fd); }
  } closer{fd};
  struct stat st;
  TORCH_CHECK(fstat(fd, &st) == 0, "tvm_class: cannot stat the ", what, " file '", path, "': ",
              std::strerror(errno));
  TORCH_CHECK(S_ISREG(st.st_mode), "tvm_class: the ", what, " file '", path,
              "' is not a regular file (a device, FIFO, socket or directory); refusing to read "
              "it");
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  TORCH_CHECK(size <= max_bytes, "tvm_class: the ", what, " file '", path, "' is ", size,
              " bytes, more than the ", max_bytes, " accepted");
  std::string bytes(size, '\0');
  size_t done = 0;
  while (done < size) {
    ssize_t n = read(fd, bytes.data() + done, size - done);
    if (n < 0 && errno == EINTR) continue;
    TORCH_CHECK(n >= 0, "tvm_class: error reading the ", what, " file '", path, "': ",
                std::strerror(errno));
    TORCH_CHECK(n > 0, "tvm_class: the ", what, " file '", path, "' shrank while it was read (",
                done, " of ", size, " bytes); it is being replaced, retry");
    done += static_cast<size_t>(n);
  }
  return bytes;
}

}  // namespace tvm_torch

// ---- One copy per process ----

namespace {

/*! \brief Registered by the first copy of this library; its presence means "already loaded". */
constexpr const char* kLibraryPathFunc = "tvm_torch.runtime_library_path";

std::string OwnPath() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&OwnPath), &info) != 0 && info.dli_fname != nullptr) {
    return info.dli_fname;
  }
  return "";
}

void SkippedInitializer() {}

/*!
 * \brief Runs before this library's other static initialisers. A second copy of the library
 *        (another file, so dlopen maps it again) would register every torch class, TVM type and
 *        function a second time, and a duplicate registration throws from a static initialiser:
 *        std::terminate, SIGABRT. When a copy is already loaded, this one says so and replaces
 *        its remaining initialisers with no-ops: it registers nothing, and the loaded copy
 *        keeps serving (no code of this copy is reachable: it exports no symbols).
 */
__attribute__((constructor(101))) void GuardAgainstSecondCopy() {
  std::string first;
  try {
    auto func = tvm::ffi::Function::GetGlobal(kLibraryPathFunc);
    if (!func.has_value()) return;
    first = (*func)().cast<tvm::ffi::String>();
  } catch (...) {
    return;
  }
  const std::string self = OwnPath();
  std::fprintf(stderr,
               "tvm_class: warning: the TVM runtime library '%s' is already loaded in this "
               "process; the copy at '%s' is left uninitialised (a second copy cannot register "
               "the same classes), and the loaded one serves.\n",
               first.c_str(), self.c_str());
  // Find this library's DT_INIT_ARRAY through its dynamic section (_DYNAMIC, declared by
  // <link.h>, defined by the linker) and blank what follows this initialiser.
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&GuardAgainstSecondCopy), &info) == 0) return;
  const auto base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  uintptr_t array = 0;
  size_t bytes = 0;
  for (ElfW(Dyn)* d = _DYNAMIC; d->d_tag != DT_NULL; ++d) {
    if (d->d_tag == DT_INIT_ARRAY) array = base + d->d_un.d_ptr;
    if (d->d_tag == DT_INIT_ARRAYSZ) bytes = d->d_un.d_val;
  }
  if (array == 0 || bytes == 0) return;
  auto* entries = reinterpret_cast<uintptr_t*>(array);
  const size_t count = bytes / sizeof(uintptr_t);
  const auto self_entry = reinterpret_cast<uintptr_t>(&GuardAgainstSecondCopy);
  size_t first_after = count;
  for (size_t i = 0; i < count; ++i) {
    if (entries[i] == self_entry) {
      first_after = i + 1;
      break;
    }
  }
  if (first_after >= count) return;
  const long page = sysconf(_SC_PAGESIZE);
  const uintptr_t lo = array & ~static_cast<uintptr_t>(page - 1);
  const uintptr_t hi = array + bytes;
  if (mprotect(reinterpret_cast<void*>(lo), hi - lo, PROT_READ | PROT_WRITE) != 0) return;
  for (size_t i = first_after; i < count; ++i) {
    entries[i] = reinterpret_cast<uintptr_t>(&SkippedInitializer);
  }
  mprotect(reinterpret_cast<void*>(lo), hi - lo, PROT_READ);
}

std::vector<std::string> ToStrings(const tvm::ffi::Array<tvm::ffi::String>& items) {
  std::vector<std::string> out;
  for (const auto& s : items) out.emplace_back(s);
  return out;
}

tvm::ffi::Array<tvm::ffi::String> ToArray(const std::vector<std::string>& items) {
  tvm::ffi::Array<tvm::ffi::String> out;
  for (const std::string& s : items) out.push_back(tvm::ffi::String(s));
  return out;
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def(kLibraryPathFunc, []() { return tvm::ffi::String(OwnPath()); })
      .def("tvm_torch.set_trusted_libraries",
           [](tvm::ffi::Optional<tvm::ffi::Array<tvm::ffi::String>> digests) {
             if (digests.has_value()) {
               tvm_torch::SetTrustedLibraries(ToStrings(*digests));
             } else {
               tvm_torch::SetTrustedLibraries(std::nullopt);
             }
           })
      .def("tvm_torch.trusted_libraries",
           []() -> tvm::ffi::Optional<tvm::ffi::Array<tvm::ffi::String>> {
             auto trusted = tvm_torch::TrustedLibraries();
             if (!trusted.has_value()) return std::nullopt;
             return ToArray(*trusted);
           })
      .def("tvm_torch.sha256",
           [](tvm::ffi::Bytes data) { return tvm::ffi::String(tvm_torch::Sha256Hex(data)); })
      .def("tvm_torch.missing_cpu_features",
           [](tvm::ffi::Array<tvm::ffi::String> features) {
             auto missing = tvm_torch::MissingCpuFeatures(ToStrings(features));
             return ToArray(missing);
           });
}
