/* A stand-in bcryptprimitives.dll for Wine 8, which lacks it: Rust's standard library imports
 * ProcessPrng from it, and without the DLL every Rust .exe exits at once with code 53.
 * ProcessPrng fills a buffer with random bytes; we forward to advapi32's RtlGenRandom
 * (exported as SystemFunction036), in chunks because it takes a 32-bit length.
 * Built by .ci/windows with x86_64-w64-mingw32-gcc; only used under Wine, never shipped. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG n = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, n))
            return FALSE;
        data += n;
        len -= n;
    }
    return TRUE;
}

BOOL WINAPI DllMain(HINSTANCE instance, DWORD reason, LPVOID reserved)
{
    (void)instance;
    (void)reason;
    (void)reserved;
    return TRUE;
}
